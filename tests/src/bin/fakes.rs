//! `wiproxy-fakes DIR`: the fake GKE metadata server on loopback, for benchmarks and manual runs.
//! Writes into DIR the test CA (`ca.pem`), a certificate and key for `bench.example.com`
//! (`upstream.crt`, `upstream.key`, for an HTTPS upstream such as nginx) and `env`, the
//! `GCE_METADATA_HOST` line a sidecar needs; then serves until killed.

use std::path::PathBuf;

use anyhow::Context;
use wiproxy_tests::google::{metadata_router, Google};
use wiproxy_tests::pki::TestCa;
use wiproxy_tests::serve;
use wiproxy_tests::world::GSA;

const UPSTREAM_HOST: &str = "bench.example.com";

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: wiproxy-fakes DIR")?);
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let ca = TestCa::new();
        std::fs::write(dir.join("ca.pem"), ca.pem())?;
        let (cert, key) = ca.server_pem(&[UPSTREAM_HOST]);
        std::fs::write(dir.join("upstream.crt"), cert)?;
        std::fs::write(dir.join("upstream.key"), key)?;
        let metadata = serve::http(metadata_router(Google::new(GSA))).await;
        std::fs::write(
            dir.join("env"),
            format!("GCE_METADATA_HOST={metadata}\nWIPROXY_EXPECTED_SERVICE_ACCOUNT={GSA}\n"),
        )?;
        println!("metadata server on http://{metadata}; files in {}", dir.display());
        std::future::pending::<()>().await;
        Ok(())
    })
}
