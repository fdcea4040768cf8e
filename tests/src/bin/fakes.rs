//! `wiproxy-fakes DIR [HOST…]`: the fakes on loopback, for benchmarks, the interop suite, the
//! image test and manual runs: the GKE metadata server, Google's token APIs and the Cloud
//! Function front end (see `World`). Writes into DIR the test CA (`ca.pem`), a certificate and
//! key for `bench.example.com` and every HOST given (`upstream.crt`, `upstream.key`, for HTTPS
//! upstreams such as nginx), the keys that verify the ID tokens (`jwks.json`, as Google
//! publishes them at `/oauth2/v3/certs`), `env` (the
//! `GCE_METADATA_HOST` and expected-GSA lines a sidecar needs) and `function.env` (`WIPROXY_RESOLVE`
//! pinning the function's hosts to the fake front end, and its address as `FUNCTION_ADDR`); then
//! serves until killed. `WIPROXY_FAKES_METADATA_DELAY_MS` makes the metadata server answer
//! identity requests that late (GKE's can take seconds on a new pod).

use std::path::PathBuf;

use anyhow::Context;
use wiproxy_tests::world::{World, GSA};

const UPSTREAM_HOST: &str = "bench.example.com";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: wiproxy-fakes DIR [HOST…]")?);
    let hosts: Vec<String> = std::iter::once(UPSTREAM_HOST.to_owned()).chain(args).collect();
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let world = World::start().await;
        let delay = std::env::var("WIPROXY_FAKES_METADATA_DELAY_MS").ok().and_then(|d| d.parse().ok()).unwrap_or(0);
        world.google.delay_ms.store(delay, std::sync::atomic::Ordering::SeqCst);
        std::fs::write(dir.join("ca.pem"), world.ca.pem())?;
        let (cert, key) = world.ca.server_pem(&hosts.iter().map(String::as_str).collect::<Vec<_>>());
        std::fs::write(dir.join("jwks.json"), world.google.verifier().jwks().to_string())?;
        std::fs::write(dir.join("upstream.crt"), cert)?;
        std::fs::write(dir.join("upstream.key"), key)?;
        std::fs::write(
            dir.join("function.env"),
            format!("WIPROXY_RESOLVE={}\nFUNCTION_ADDR={}\n", world.resolve(), world.function_addr),
        )?;
        // Written last, and whole (a rename): its presence tells a waiting script that every file is complete.
        std::fs::write(
            dir.join("env.partial"),
            format!("GCE_METADATA_HOST={}\nWIPROXY_EXPECTED_SERVICE_ACCOUNT={GSA}\n", world.metadata),
        )?;
        std::fs::rename(dir.join("env.partial"), dir.join("env"))?;
        println!(
            "metadata server on http://{}, function front end on https://{}; files in {}",
            world.metadata,
            world.function_addr,
            dir.display()
        );
        std::future::pending::<()>().await;
        Ok(())
    })
}
