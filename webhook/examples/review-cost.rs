//! `review-cost REVIEW POLICIES CLUSTER COUNT`: answers one AdmissionReview body COUNT times
//! through the same path `/mutate` takes (parse, decide, respond, serialise), without sockets or
//! TLS, so an instruction counter (`valgrind --tool=callgrind`) sees the cost of a review alone.
//! `make bench` runs it at two counts and divides the difference.

use std::path::Path;

use anyhow::Context;
use wiproxy_webhook::admission::answer;
use wiproxy_webhook::cluster::StaticCluster;
use wiproxy_webhook::inject::SidecarSettings;
use wiproxy_webhook::policy::PolicySet;
use wiproxy_webhook::review::Endpoint;
use wiproxy_webhook::{yaml, Webhook};

/// The allocator the webhook binary runs with, so the count is the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, review, policies, cluster, count] = args.as_slice() else {
        anyhow::bail!("usage: review-cost REVIEW POLICIES CLUSTER COUNT");
    };
    let body = std::fs::read(review).with_context(|| format!("reading {review}"))?;
    let policies = yaml::load_policies(Path::new(policies))?;
    let documents = yaml::parse_stream(&yaml::read_file(Path::new(cluster))?, cluster)?;
    let mut state = StaticCluster::default();
    state.add_documents(&documents, "default");
    let webhook = Webhook::from_files(SidecarSettings::default(), PolicySet::new(policies, true), state);
    let count: usize = count.parse().context("COUNT is a number")?;
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    let mut bytes = 0;
    for _ in 0..count {
        let (response, _) = runtime.block_on(answer(&webhook, Endpoint::Mutate, &body))?;
        bytes += response.len();
    }
    println!("{count} reviews, {bytes} bytes answered");
    Ok(())
}
