//! Where the SDK's configuration comes from.

use aws_config::{BehaviorVersion, Region, SdkConfig};

/// How to reach AWS: the region and, for emulators such as moto, an endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSettings {
    /// The region, e.g. `eu-west-1`.
    pub region: String,
    /// An endpoint for every service instead of AWS's, e.g. `http://127.0.0.1:5055` for moto.
    /// S3 is then addressed path-style (`ENDPOINT/bucket/key`).
    pub endpoint_url: Option<String>,
}

/// The SDK configuration for `settings`: the given region and endpoint, credentials from the
/// standard chain (environment, profile, SSO cache, web identity, container and instance
/// metadata). Credentials are looked up lazily, at the first request.
pub async fn sdk_config(settings: &AwsSettings) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(settings.region.clone()));
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

/// An S3 client for `conf`, path-style when an endpoint is set (emulators have no
/// per-bucket host names).
pub(crate) fn s3_client(conf: &SdkConfig) -> aws_sdk_s3::Client {
    let builder = aws_sdk_s3::config::Builder::from(conf);
    let builder = if conf.endpoint_url().is_some() {
        builder.force_path_style(true)
    } else {
        builder
    };
    aws_sdk_s3::Client::from_conf(builder.build())
}
