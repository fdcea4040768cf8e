//! Upstreams with their own port (`;listen=PORT`): the port must be free in the pod (pods share
//! one network namespace), and the app learns it as `WIPROXY_<NAME>_ADDR`. Pure: no I/O.

use k8s_openapi::api::core::v1::PodSpec;
use wiproxy_common::{env, Upstream};

use crate::denial::Denial;
use crate::mesh::Mesh;

/// Refuses an upstream port that is the proxy port, the admin port, a port a container of the
/// pod declares, or a port of a service mesh's proxy in the pod.
pub fn check(
    spec: &PodSpec,
    proxy_port: u16,
    admin_port: u16,
    meshes: &[Mesh],
    upstreams: &[Upstream],
) -> Result<(), Denial> {
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
        } else if port == admin_port {
            Some("the sidecar's admin port (wiproxy.io/admin-port)".to_owned())
        } else if let Some(mesh) = meshes.iter().find(|m| m.kind.ports().contains(&port)) {
            Some(format!("a port of the {} proxy", mesh.kind.name()))
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
    use wiproxy_common::{parse_upstreams, ADMIN_PORT};

    use crate::mesh::MeshKind;

    #[test]
    fn upstream_ports_must_be_free_in_the_pod() {
        let spec: PodSpec = serde_json::from_value(json!({
            "initContainers": [{"name": "setup", "image": "i", "ports": [{"containerPort": 9000}]}],
            "containers": [{"name": "app", "image": "a", "ports": [{"containerPort": 8080}]}],
        }))
        .expect("spec");
        let istio = [Mesh { kind: MeshKind::Istio, native_proxy: None, leading_proxy: None, injected: false }];
        let clash = |list: &str| {
            check(&spec, 15080, ADMIN_PORT, &istio, &parse_upstreams(list).expect("valid"))
                .map_err(|denial| denial.to_string())
        };
        assert_eq!(clash("grpc=https://g.a.run.app;listen=15082,fn=https://f.a.run.app"), Ok(()));
        for (list, expected) in [
            ("grpc=https://g.a.run.app;listen=8080", "port of container \"app\""),
            ("grpc=https://g.a.run.app;listen=9000", "port of container \"setup\""),
            ("grpc=https://g.a.run.app;listen=15080", "proxy port"),
            (&format!("grpc=https://g.a.run.app;listen={ADMIN_PORT}"), "admin port"),
            ("grpc=https://g.a.run.app;listen=15006", "port of the Istio proxy"),
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
