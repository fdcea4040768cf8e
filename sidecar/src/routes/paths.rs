//! Whether a path stays under its upstream's prefix under every reading a real server may
//! apply to it: the rule that decides whether a token may go with the request.

use http::StatusCode;

use super::{refuse, Refusal};

/// Refuses a path that would climb above its start under any reading a server might apply:
/// dot-segments plain or percent-encoded (even twice), `/`, `\`, `%2F` or `%5C` taken as
/// separators or not, `;` parameters stripped or not, overlong UTF-8 (`%c0%ae`), IIS's `%u002e`,
/// look-alikes that Unicode NFKC folds to `.`, `/` or `\` (`．`, `‥`, `／`), and a segment cut
/// short at a decoded NUL, `?` or `#`. Nothing is rewritten: a path that passes is forwarded
/// byte for byte, so `a%2Fb` object names still reach the upstream as written.
pub fn check_dot_segments(rest: &str) -> Result<(), Refusal> {
    if climbs_out(rest) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the path climbs out of the upstream's path under some server's reading of it ('..' plain, percent-encoded, overlong UTF-8, %u-escaped or a Unicode look-alike; with '\\', '%2F', '%5C' or ';'; or cut at an encoded NUL, '?' or '#'): remove the dot-segments and those encodings",
        ));
    }
    Ok(())
}

/// RFC 3986's `remove_dot_segments` applied to the percent-decoded `path`: whether it stays at or
/// below its start. The plainest reading a server may make, kept apart from [`climbs_out`]'s
/// own code so that the routing's property tests and fuzz target check it against an
/// independent oracle.
#[doc(hidden)]
pub fn stays_inside_decoded(path: &str) -> bool {
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let mut depth = 0i64;
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Whether some reading of `path` climbs above its start. Each reading splits on `/` and,
/// depending on the reading, on `\`, on the percent-encoded separators and on the exotic ones
/// (overlong UTF-8, `%u` escapes, look-alikes), strips `;` parameters or not, and decodes each
/// segment (every encoding and look-alike at once, which can only turn more segments into
/// dot-segments) before comparing it with `.` and `..`. Empty segments never count as a level
/// (a server that merges slashes reads them so).
pub fn climbs_out(path: &str) -> bool {
    // Quick exit: without a dot, plain or encoded, and without non-ASCII bytes (look-alikes),
    // no reading has a dot-segment.
    if path.is_ascii() && !path.contains('.') && !path.contains('%') {
        return false;
    }
    (0u8..32).any(|reading| {
        climbs_out_as(
            path,
            Reading {
                backslash: reading & 1 != 0,
                encoded: reading & 2 != 0,
                params: reading & 4 != 0,
                decode_first: reading & 8 != 0,
                exotic_separators: reading & 16 != 0,
            },
        )
    })
}

/// One way a server may read a path.
#[derive(Clone, Copy)]
struct Reading {
    /// `\` is a separator (IIS, Windows, Tomcat on Windows).
    backslash: bool,
    /// `%2F`, `%5C` (and `%25` before them) are decoded before splitting.
    encoded: bool,
    /// `;params` are stripped from a segment (Tomcat, Jetty).
    params: bool,
    /// Segments are decoded before the parameters are stripped.
    decode_first: bool,
    /// Overlong UTF-8, `%u` escapes and look-alikes of `/` and `\` are separators.
    exotic_separators: bool,
}

fn climbs_out_as(path: &str, reading: Reading) -> bool {
    // Separators are made plain first when this reading takes them as such (repeatedly, for a
    // server that decodes more than once).
    let mut text = path.to_owned();
    if reading.encoded || reading.exotic_separators {
        for _ in 0..4 {
            let mut next = text.clone();
            if reading.encoded {
                next = replace_ignore_case(&replace_ignore_case(&next, "%2f", "/"), "%5c", "\\");
                next = replace_ignore_case(&next, "%25", "%");
            }
            if reading.exotic_separators {
                next = lenient_decode(&next, false);
            }
            if next == text {
                break;
            }
            text = next;
        }
    }
    let mut depth: i64 = 0;
    let separators = |c: char| c == '/' || (reading.backslash && c == '\\');
    for segment in text.split(separators) {
        let mut segment = if reading.decode_first { decode_segment(segment) } else { segment.to_owned() };
        if reading.params {
            if let Some(at) = segment.find(';') {
                segment.truncate(at);
            }
        }
        let segment = decode_segment(&segment);
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

fn replace_ignore_case(text: &str, from: &str, to: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while let Some(found) = lower[at..].find(from) {
        out.push_str(&text[at..at + found]);
        out.push_str(to);
        at += found + from.len();
    }
    out.push_str(&text[at..]);
    out
}

/// A segment as the most lenient server reads it: decoded until nothing changes (a server may
/// decode twice), every encoding and look-alike included, then cut at a NUL (C strings), `?` or
/// `#` (a server that decodes and parses the URL again). Only the comparison with `.` and `..`
/// reads the result.
fn decode_segment(segment: &str) -> String {
    let mut text = segment.to_owned();
    for _ in 0..4 {
        if text.is_ascii() && !text.contains('%') {
            break;
        }
        let next = lenient_decode(&text, true);
        if next == text {
            break;
        }
        text = next;
    }
    if let Some(at) = text.find(['\0', '?', '#']) {
        text.truncate(at);
    }
    text
}

/// One pass of the most lenient decoder a server may have: `%XX` bytes and IIS's `%uXXXX`
/// escapes decoded, UTF-8 sequences joined into their code point even when overlong
/// (`%c0%ae` is `.`, as old decoders read it; 5- and 6-byte forms too), then each character
/// folded by [`look_alike`]. With `ascii_escapes` false, an escape of an ASCII byte (`%2e`,
/// `%2f`) is left as written: only the exotic forms are read.
fn lenient_decode(text: &str, ascii_escapes: bool) -> String {
    let bytes = text.as_bytes();
    let hex = |at: usize, len: usize| -> Option<u32> {
        let digits = bytes.get(at..at + len)?;
        digits
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then(|| digits.iter().fold(0, |value, digit| value * 16 + (*digit as char).to_digit(16).unwrap_or(0)))
    };
    // A byte as written: `%XX` (3 bytes of text) or itself.
    let byte = |at: usize| -> Option<(u8, usize)> {
        match bytes.get(at)? {
            b'%' => hex(at + 1, 2).map(|value| (value as u8, 3)).or(Some((b'%', 1))),
            other => Some((*other, 1)),
        }
    };
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' && matches!(bytes.get(at + 1), Some(b'u' | b'U')) {
            if let Some(code) = hex(at + 2, 4) {
                push_folded(&mut out, char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
                at += 6;
                continue;
            }
        }
        let Some((lead, used)) = byte(at) else { break };
        if lead < 0x80 {
            if used == 3 && !ascii_escapes {
                out.push_str(&text[at..at + 3]);
            } else {
                push_folded(&mut out, lead as char);
            }
            at += used;
            continue;
        }
        let (follow, mut code) = match lead {
            0xC0..=0xDF => (1, u32::from(lead & 0x1F)),
            0xE0..=0xEF => (2, u32::from(lead & 0x0F)),
            0xF0..=0xF7 => (3, u32::from(lead & 0x07)),
            0xF8..=0xFB => (4, u32::from(lead & 0x03)),
            0xFC..=0xFD => (5, u32::from(lead & 0x01)),
            _ => (0, u32::MAX),
        };
        let mut next = at + used;
        let mut complete = follow > 0;
        for _ in 0..follow {
            match byte(next) {
                Some((continuation @ 0x80..=0xBF, len)) => {
                    code = (code << 6) | u32::from(continuation & 0x3F);
                    next += len;
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        if complete {
            push_folded(&mut out, char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
            at = next;
        } else if used == 3 {
            // `%XX` that starts no sequence: kept as written.
            out.push_str(&text[at..at + 3]);
            at += 3;
        } else {
            // A raw byte that starts no sequence is part of a character: copied whole.
            match text.get(at..).and_then(|rest| rest.chars().next()) {
                Some(c) => {
                    push_folded(&mut out, c);
                    at += c.len_utf8();
                }
                None => {
                    out.push(char::REPLACEMENT_CHARACTER);
                    at += 1;
                }
            }
        }
    }
    out
}

fn push_folded(out: &mut String, c: char) {
    match look_alike(c) {
        Some(folded) => out.push_str(folded),
        None => out.push(c),
    }
}

/// What a server that applies Unicode NFKC (Python's `unicodedata.normalize`, IDNA-style
/// handling, some WAFs and frameworks) reads a character as, for the characters whose NFKC form
/// holds `.`, `/`, `\`, `%`, `;`, `?` or `#`, written by hand from UnicodeData.txt's
/// compatibility decompositions; plus U+2215 DIVISION SLASH and U+2044 FRACTION SLASH, which
/// NFKC keeps but Windows' best-fit mapping (IIS) reads as `/`. The fullwidth forms
/// U+FF01..U+FF5E are ASCII 0x21..0x7E shifted (fullwidth `．` U+FF0E, `／` U+FF0F, `％` U+FF05).
fn look_alike(c: char) -> Option<&'static str> {
    const ASCII: &str =
        "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";
    let folded = match c {
        '\u{FF01}'..='\u{FF5E}' => {
            let at = c as usize - 0xFF01;
            &ASCII[at..at + 1]
        }
        '\u{2024}' | '\u{FE52}' => ".",   // ONE DOT LEADER, SMALL FULL STOP
        '\u{2025}' | '\u{FE30}' => "..",  // TWO DOT LEADER, its vertical form
        '\u{2026}' | '\u{FE19}' => "...", // HORIZONTAL ELLIPSIS, its vertical form
        '\u{FE68}' => "\\",               // SMALL REVERSE SOLIDUS
        '\u{2215}' | '\u{2044}' => "/",   // DIVISION SLASH, FRACTION SLASH (best fit)
        '\u{FE6A}' => "%",                // SMALL PERCENT SIGN
        '\u{FE54}' | '\u{037E}' => ";",   // SMALL SEMICOLON, GREEK QUESTION MARK
        '\u{FE56}' => "?",                // SMALL QUESTION MARK
        '\u{2047}' => "??",               // DOUBLE QUESTION MARK
        '\u{2048}' => "?!",               // QUESTION EXCLAMATION MARK
        '\u{2049}' => "!?",               // EXCLAMATION QUESTION MARK
        '\u{FE5F}' => "#",                // SMALL NUMBER SIGN
        _ => return None,
    };
    Some(folded)
}
