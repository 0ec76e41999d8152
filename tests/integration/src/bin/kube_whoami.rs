//! Run inside a pod of the node simulator: connects with kube-rs's default configuration (in a pod: the
//! in-cluster one, from `KUBERNETES_SERVICE_HOST`/`_PORT` and the mounted ServiceAccount token, CA and
//! namespace) and prints who the API server says it is (a SelfSubjectReview) and the default namespace.

use taskpods_harness::kube::k8s_openapi::api::authentication::v1::SelfSubjectReview;
use taskpods_harness::kube::kube::api::PostParams;
use taskpods_harness::kube::kube::{Api, Client};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = Client::try_default().await?;
    let namespace = client.default_namespace().to_owned();
    let reviews: Api<SelfSubjectReview> = Api::all(client);
    let review = reviews
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    let user = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username)
        .unwrap_or_default();
    println!("user={user} namespace={namespace}");
    Ok(())
}
