//! Upstreams with their own port (`;listen=PORT`): the port must be free in the pod (pods share
//! one network namespace), and the app learns it as `WIPROXY_<NAME>_ADDR`. Pure: no I/O.

use k8s_openapi::api::core::v1::PodSpec;
use wiproxy_common::{env, Upstream, ADMIN_PORT};

use crate::denial::Denial;

/// Refuses an upstream port that is the proxy port, the admin port, or a port a container of the
/// pod declares.
pub fn check(spec: &PodSpec, proxy_port: u16, upstreams: &[Upstream]) -> Result<(), Denial> {
    let containers = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    let declared: Vec<(u16, &str)> = containers
        .flat_map(|c| {
            c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).map(|p| (p, c.name.as_str()))
        })
        .collect();
    for upstream in upstreams {
        let Some(port) = upstream.listen else { continue };
        let taken_by = if port == proxy_port {
            Some("the sidecar's proxy port (wiproxy.io/port)".to_owned())
        } else if port == ADMIN_PORT {
            Some("the sidecar's admin port".to_owned())
        } else {
            declared.iter().find(|(p, _)| *p == port).map(|(_, name)| format!("a port of container {name:?}"))
        };
        if let Some(taken_by) = taken_by {
            return Err(Denial::ListenPortClash { upstream: upstream.name.clone(), port, taken_by });
        }
    }
    Ok(())
}

/// `WIPROXY_<NAME>_ADDR=127.0.0.1:PORT` for each upstream with its own port.
pub fn app_env(upstreams: &[Upstream]) -> impl Iterator<Item = (String, String)> + '_ {
    upstreams.iter().filter_map(|u| u.listen.map(|port| (env::upstream_addr(&u.name), format!("127.0.0.1:{port}"))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use wiproxy_common::parse_upstreams;

    #[test]
    fn upstream_ports_must_be_free_in_the_pod() {
        let spec: PodSpec = serde_json::from_value(json!({
            "initContainers": [{"name": "setup", "image": "i", "ports": [{"containerPort": 9000}]}],
            "containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}],
        }))
        .expect("spec");
        let clash = |list: &str| {
            check(&spec, 15080, &parse_upstreams(list).expect("valid")).map_err(|denial| denial.to_string())
        };
        assert_eq!(clash("grpc=https://g.a.run.app;listen=15081,fn=https://f.a.run.app"), Ok(()));
        for (list, expected) in [
            ("grpc=https://g.a.run.app;listen=8080", "port of container \"app\""),
            ("grpc=https://g.a.run.app;listen=9000", "port of container \"setup\""),
            ("grpc=https://g.a.run.app;listen=15080", "proxy port"),
            (&format!("grpc=https://g.a.run.app;listen={ADMIN_PORT}"), "admin port"),
        ] {
            let message = clash(list).expect_err(list);
            assert!(message.contains(expected) && message.contains("listen="), "{list}: {message}");
        }
    }

    #[test]
    fn the_app_learns_each_upstream_port() {
        let upstreams =
            parse_upstreams("grpc-api=https://g.a.run.app;listen=15081,fn=https://f.a.run.app").expect("valid");
        assert_eq!(
            app_env(&upstreams).collect::<Vec<_>>(),
            [("WIPROXY_GRPC_API_ADDR".to_owned(), "127.0.0.1:15081".to_owned())]
        );
    }
}
