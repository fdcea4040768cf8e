//! The fake Kubernetes API server keeps the promises of the API concepts page that the webhook's
//! watches rely on: consistent pages, expiring continue tokens, the resourceVersion table,
//! watches from a resourceVersion with 410 once its history is gone, metadata-only answers and
//! conditional patches. Plain HTTP requests, as a client would send them.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use wiproxy_tests::apiserver::{ApiServer, TOKEN};
use wiproxy_tests::client::{Http, Reply};

const METADATA_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const METADATA: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

async fn get(server: &ApiServer, path_and_query: &str, accept: &str) -> Reply {
    let request = Request::get(format!("{}{path_and_query}", server.url()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("accept", accept)
        .body(Full::new(Bytes::new()))
        .expect("request");
    Http::new().send(request).await.expect("the fake answers")
}

async fn patch(server: &ApiServer, path: &str, content_type: &str, body: Value) -> Reply {
    let request = Request::patch(format!("{}{path}", server.url()))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("accept", METADATA)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    Http::new().send(request).await.expect("the fake answers")
}

fn names(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| {
            format!(
                "{}/{}",
                item["metadata"]["namespace"].as_str().unwrap_or(""),
                item["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

async fn populated(namespaces: usize, service_accounts: usize) -> ApiServer {
    let server = ApiServer::start().await;
    let mut cluster = server.cluster();
    cluster.populate(namespaces, service_accounts, 0);
    cluster.compact();
    drop(cluster);
    server
}

#[tokio::test]
async fn pages_are_one_consistent_snapshot() {
    let server = populated(10, 250).await;
    let first = get(&server, "/api/v1/serviceaccounts?limit=100", METADATA_LIST).await.json();
    assert_eq!(first["kind"], "PartialObjectMetadataList");
    assert_eq!(first["items"][0]["kind"], "PartialObjectMetadata");
    assert!(first["items"][0].get("spec").is_none());
    assert_eq!(first["metadata"]["remainingItemCount"], 150);
    let snapshot = first["metadata"]["resourceVersion"].clone();
    // Changed between pages: none of it shows in the rest of this list.
    {
        let mut cluster = server.cluster();
        cluster.add_service_account("ns-00009", "zz-created-meanwhile", None);
        cluster.delete_service_account("ns-00009", "sa-000249");
        cluster.annotate_service_account("ns-00009", "sa-000239", Some("late@client-project.iam.gserviceaccount.com"));
    }
    let mut seen = names(&first);
    let mut token = first["metadata"]["continue"].as_str().expect("a continue token").to_owned();
    let mut pages = 1;
    loop {
        let page = get(&server, &format!("/api/v1/serviceaccounts?limit=100&continue={token}"), METADATA_LIST).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let page = page.json();
        pages += 1;
        assert_eq!(page["metadata"]["resourceVersion"], snapshot, "every page at the first page's resourceVersion");
        seen.extend(names(&page));
        for item in page["items"].as_array().expect("items") {
            let annotations = &item["metadata"]["annotations"];
            assert_ne!(annotations["iam.gke.io/gcp-service-account"], "late@client-project.iam.gserviceaccount.com");
        }
        match page["metadata"]["continue"].as_str() {
            Some(next) => {
                assert_eq!(page["metadata"]["remainingItemCount"], json!(250 - seen.len()));
                token = next.to_owned();
            }
            None => {
                assert!(
                    page["metadata"].get("remainingItemCount").is_none(),
                    "the last page has no remainingItemCount"
                );
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250, "every object once");
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 250, "no object twice");
    assert!(seen.contains(&"ns-00009/sa-000249".to_owned()), "deleted after the snapshot: still in it");
    assert!(!seen.iter().any(|n| n.ends_with("zz-created-meanwhile")), "created after the snapshot: not in it");
    // A new list sees the changes.
    let fresh = names(&get(&server, "/api/v1/serviceaccounts", METADATA_LIST).await.json());
    assert!(
        fresh.contains(&"ns-00009/zz-created-meanwhile".to_owned())
            && !fresh.contains(&"ns-00009/sa-000249".to_owned())
    );
    // One namespace's collection pages within it.
    let namespaced = get(&server, "/api/v1/namespaces/ns-00003/serviceaccounts?limit=10", METADATA_LIST).await.json();
    assert!(names(&namespaced).iter().all(|n| n.starts_with("ns-00003/")));
    assert_eq!(namespaced["metadata"]["remainingItemCount"], 15);
}

#[tokio::test]
async fn a_continue_token_past_compaction_is_410_expired() {
    let server = populated(2, 30).await;
    let first = get(&server, "/api/v1/serviceaccounts?limit=10", METADATA_LIST).await.json();
    let token = first["metadata"]["continue"].as_str().expect("a continue token").to_owned();
    {
        let mut cluster = server.cluster();
        cluster.add_namespace("later", &[]);
        cluster.compact();
    }
    let expired = get(&server, &format!("/api/v1/serviceaccounts?limit=10&continue={token}"), METADATA_LIST).await;
    assert_eq!(expired.status, StatusCode::GONE);
    let status = expired.json();
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str(), status["code"].as_u64()),
        (Some("Status"), Some("Expired"), Some(410))
    );
    // The inconsistent remainder it offers starts where the token left off.
    let rest = status["metadata"]["continue"].as_str().expect("an inconsistent continue token");
    let remainder =
        get(&server, &format!("/api/v1/serviceaccounts?limit=100&continue={rest}"), METADATA_LIST).await.json();
    assert_eq!(names(&remainder).len(), 20, "the 30 ServiceAccounts less the first page");
}

#[tokio::test]
async fn list_parameters_follow_the_resource_version_table() {
    let server = populated(1, 5).await;
    let current: u64 = server.cluster().revision();
    let cases: Vec<(String, &str, StatusCode)> = vec![
        (
            "/api/v1/serviceaccounts?resourceVersionMatch=NotOlderThan".into(),
            METADATA_LIST,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "/api/v1/serviceaccounts?resourceVersion=0&resourceVersionMatch=Exact".into(),
            METADATA_LIST,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("/api/v1/serviceaccounts?limit=1&continue=x&resourceVersion=5".into(), METADATA_LIST, StatusCode::BAD_REQUEST),
        ("/api/v1/serviceaccounts?limit=1&continue=not-a-token".into(), METADATA_LIST, StatusCode::BAD_REQUEST),
        (
            format!("/api/v1/serviceaccounts?resourceVersion={}", current + 10),
            METADATA_LIST,
            StatusCode::GATEWAY_TIMEOUT,
        ),
        // Exact (a resourceVersion with a limit) below the compacted history: gone.
        ("/api/v1/serviceaccounts?resourceVersion=2&limit=2".into(), METADATA_LIST, StatusCode::GONE),
        (
            "/api/v1/serviceaccounts?resourceVersion=2&resourceVersionMatch=Exact".into(),
            METADATA_LIST,
            StatusCode::GONE,
        ),
        // Not older than: served at the latest revision.
        ("/api/v1/serviceaccounts?resourceVersion=2".into(), METADATA_LIST, StatusCode::OK),
        (
            "/api/v1/serviceaccounts?resourceVersion=2&resourceVersionMatch=NotOlderThan&limit=2".into(),
            METADATA_LIST,
            StatusCode::OK,
        ),
        ("/api/v1/serviceaccounts?resourceVersion=0&limit=2".into(), METADATA_LIST, StatusCode::OK),
        // Media types: a list as a single object's metadata, or one the fake cannot encode.
        ("/api/v1/serviceaccounts".into(), METADATA, StatusCode::NOT_ACCEPTABLE),
        ("/api/v1/serviceaccounts".into(), "application/vnd.kubernetes.protobuf", StatusCode::NOT_ACCEPTABLE),
        ("/api/v1/serviceaccounts".into(), "application/vnd.kubernetes.protobuf, application/json", StatusCode::OK),
        ("/api/v1/namespaces/ns-00000/serviceaccounts/sa-000001".into(), METADATA_LIST, StatusCode::NOT_ACCEPTABLE),
        ("/api/v1/namespaces/ns-00000/serviceaccounts/nobody".into(), METADATA, StatusCode::NOT_FOUND),
        ("/api/v1/serviceaccounts?labelSelector=a%3Db".into(), METADATA_LIST, StatusCode::BAD_REQUEST),
    ];
    for (path, accept, expected) in cases {
        let reply = get(&server, &path, accept).await;
        assert_eq!(reply.status, expected, "GET {path} (Accept: {accept}): {}", reply.text());
        if expected != StatusCode::OK {
            assert_eq!(reply.json()["kind"], "Status", "{path}");
        }
    }
    let full = get(&server, "/api/v1/namespaces", "application/json").await.json();
    assert_eq!(full["kind"], "NamespaceList");
    assert_eq!(full["items"][0]["spec"]["finalizers"], json!(["kubernetes"]), "the whole object");
    let unauthorised = Http::new().get(&format!("{}/api/v1/namespaces", server.url())).await;
    assert_eq!(unauthorised.status, StatusCode::UNAUTHORIZED);
}

/// The events of a watch that ends by itself (its timeout, or an error).
async fn watch_events(server: &ApiServer, query: &str) -> Vec<Value> {
    let reply = get(server, &format!("/api/v1/serviceaccounts?watch=true&{query}"), METADATA).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.text().lines().map(|line| serde_json::from_str(line).expect("one JSON event per line")).collect()
}

/// Opens a watch, waits until the fake holds it, runs `during` (which must end it), and returns
/// the events sent.
async fn watch_events_while(server: &ApiServer, query: &str, during: impl FnOnce(&ApiServer)) -> Vec<Value> {
    let watches = server.cluster().open_watches();
    let request = watch_events(server, query);
    let during = async {
        for _ in 0..500 {
            if server.cluster().open_watches() > watches {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        during(server);
    };
    let (events, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(request, during) })
        .await
        .expect("the watch ends");
    events
}

fn summary(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_owned(),
                e["object"]["metadata"]["name"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_watch_sends_every_change_after_its_resource_version_then_410_once_compacted() {
    let server = populated(1, 3).await;
    let listed = server.cluster().revision();
    let events = watch_events_while(
        &server,
        &format!("resourceVersion={listed}&allowWatchBookmarks=true&timeoutSeconds=30"),
        |server| {
            let mut cluster = server.cluster();
            cluster.add_service_account("ns-00000", "new", None);
            cluster.annotate_service_account(
                "ns-00000",
                "sa-000001",
                Some("other@client-project.iam.gserviceaccount.com"),
            );
            cluster.delete_service_account("ns-00000", "sa-000002");
            cluster.add_namespace("not-a-service-account", &[]);
            cluster.bookmark();
            cluster.close_watches();
        },
    )
    .await;
    let expected: Vec<(String, String)> =
        [("ADDED", "new"), ("MODIFIED", "sa-000001"), ("DELETED", "sa-000002"), ("BOOKMARK", "")]
            .iter()
            .map(|(t, n)| ((*t).to_owned(), (*n).to_owned()))
            .collect();
    assert_eq!(summary(&events), expected);
    assert_eq!(events[0]["object"]["kind"], "PartialObjectMetadata");
    let revisions: Vec<u64> = events
        .iter()
        .map(|e| e["object"]["metadata"]["resourceVersion"].as_str().and_then(|r| r.parse().ok()).expect("a revision"))
        .collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "in order, each after the last: {revisions:?}");
    assert_eq!(revisions[3], server.cluster().revision(), "the bookmark is at the latest revision");

    // Resumed from where it was: the same changes again, with no bookmark unless asked for.
    let resumed = watch_events(&server, &format!("resourceVersion={listed}&timeoutSeconds=1")).await;
    assert_eq!(summary(&resumed), expected[..3].to_vec());
    // Without a resourceVersion: the current state as synthetic ADDED events.
    let fresh = watch_events(&server, "timeoutSeconds=1").await;
    assert_eq!(fresh.len(), 3);
    assert!(fresh.iter().all(|e| e["type"] == "ADDED"));

    server.cluster().compact();
    let gone = watch_events(&server, &format!("resourceVersion={listed}")).await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0]["type"], "ERROR");
    assert_eq!(
        (gone[0]["object"]["code"].as_u64(), gone[0]["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
}

#[tokio::test]
async fn a_patch_is_conditional_on_the_resource_version_it_carries() {
    let server = populated(1, 1).await;
    let path = "/api/v1/namespaces/ns-00000/serviceaccounts/sa-000000";
    let read = get(&server, path, METADATA).await.json();
    let version = read["metadata"]["resourceVersion"].as_str().expect("a resourceVersion").to_owned();
    let gsa = "invoker@client-project.iam.gserviceaccount.com";
    let annotate =
        |rv: &str| json!({"metadata": {"resourceVersion": rv, "annotations": {"iam.gke.io/gcp-service-account": gsa}}});

    let stale = patch(&server, path, "application/merge-patch+json", annotate("1")).await;
    assert_eq!(stale.status, StatusCode::CONFLICT);
    assert_eq!(stale.json()["reason"], "Conflict");

    let patched = patch(&server, path, "application/merge-patch+json", annotate(&version)).await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let patched = patched.json();
    assert_eq!(patched["kind"], "PartialObjectMetadata");
    assert_eq!(patched["metadata"]["annotations"]["iam.gke.io/gcp-service-account"], gsa);
    let new_version = patched["metadata"]["resourceVersion"].as_str().expect("a resourceVersion").to_owned();
    assert_ne!(new_version, version);

    // The same change again changes nothing, so the resourceVersion stays.
    let again = patch(&server, path, "application/merge-patch+json", annotate(&new_version)).await.json();
    assert_eq!(again["metadata"]["resourceVersion"], new_version.as_str());
    let strategic = patch(&server, path, "application/strategic-merge-patch+json", annotate(&new_version)).await;
    assert_eq!(strategic.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let missing =
        patch(&server, "/api/v1/namespaces/ns-00000/serviceaccounts/nobody", "application/merge-patch+json", json!({}))
            .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}
