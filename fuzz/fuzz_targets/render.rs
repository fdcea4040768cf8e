//! `render`: any YAML text renders or fails with an error, never panics; what renders renders
//! to itself again.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let options = wiproxy_fuzz::render_options();
    if let Ok(rendered) = wiproxy_webhook::render::render(text, "fuzz.yaml", &options) {
        let again = wiproxy_webhook::render::render(&rendered.output, "fuzz.yaml", &options)
            .unwrap_or_else(|e| panic!("render's own output fails to render: {e}"));
        assert_eq!(again.output, rendered.output, "rendering the output again changed it");
    }
});
