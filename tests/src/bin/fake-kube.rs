//! `wiproxy-fake-kube --namespaces N --service-accounts N [--nodes N] [--plain-http] --dir DIR`:
//! the fake Kubernetes API server on loopback, for the benchmark's cluster curve and manual runs.
//! Serves `N` Namespaces and ServiceAccounts (see `Cluster::populate`), plus the review
//! fixture's Namespace `payments` (team=payments) and its ServiceAccount `orders-client` mapped
//! to the example policy's GSA, with the history compacted; HTTPS from a throwaway CA unless
//! `--plain-http`. Writes `DIR/kubeconfig` once listening (whole, by a rename), then serves until
//! killed.

use std::path::PathBuf;

use anyhow::{bail, Context};
use wiproxy_tests::apiserver::ApiServer;
use wiproxy_tests::pki::TestCa;
use wiproxy_tests::world::GSA;

const USAGE: &str = "usage: wiproxy-fake-kube --namespaces N --service-accounts N [--nodes N] [--plain-http] --dir DIR";

fn main() -> anyhow::Result<()> {
    let (mut namespaces, mut service_accounts, mut nodes, mut plain, mut dir) = (0, 0, 3, false, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = || -> anyhow::Result<usize> {
            args.next().and_then(|n| n.parse().ok()).with_context(|| format!("{arg} needs a number; {USAGE}"))
        };
        match arg.as_str() {
            "--namespaces" => namespaces = number()?,
            "--service-accounts" => service_accounts = number()?,
            "--nodes" => nodes = number()?,
            "--plain-http" => plain = true,
            "--dir" => dir = args.next().map(PathBuf::from),
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    let dir = dir.context(USAGE)?;
    std::fs::create_dir_all(&dir)?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let ca = TestCa::new();
        let server = if plain { ApiServer::start().await } else { ApiServer::start_tls(&ca).await };
        {
            let mut cluster = server.cluster();
            cluster.add_namespace("payments", &[("team", "payments")]);
            cluster.add_service_account("payments", "orders-client", Some(GSA));
            cluster.populate(namespaces, service_accounts, nodes);
            cluster.compact();
        }
        std::fs::write(dir.join("kubeconfig.partial"), server.kubeconfig())?;
        std::fs::rename(dir.join("kubeconfig.partial"), dir.join("kubeconfig"))?;
        println!(
            "Kubernetes API on {}: {namespaces} namespaces, {service_accounts} service accounts, {nodes} nodes; kubeconfig in {}",
            server.url(),
            dir.display()
        );
        std::future::pending::<()>().await;
        Ok(())
    })
}
