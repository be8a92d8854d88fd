//! What running the node (`edge-node --config`) checks before it dials the gateway, beyond the
//! configuration file itself. The node and `edge-node check-config` both load the file through
//! [`nearpath_config::load_node_checked`] with [`preflight`], so they cannot disagree.

use nearpath_config::{ConfigError, NodeConfig};

/// Problems with what the configuration names: the CA file must hold certificates (the node
/// reads it on every connection attempt, so a bad one would otherwise show up as a gateway
/// that never answers), and the models must build into a registry. Connects to nothing.
pub fn preflight(config: &NodeConfig) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if let Some(ca) = &config.gateway.ca_file {
        if let Err(e) = nearpath_protocol::tls::load_certs(ca) {
            errors.push(ConfigError::new("gateway.ca_file", e.to_string()));
        }
    }
    if let Err(e) = crate::inference::ModelRegistry::from_config(
        &config.models,
        Some(config.capacity.inference_concurrency as usize),
    ) {
        errors.push(ConfigError::new("models", e.to_string()));
    }
    if let Err(e) = nearpath_telemetry::check_export(&config.log) {
        errors.push(ConfigError::new("log.otlp_ca_file", e.to_string()));
    }
    // The encoder is probed only where games are served (an inference node encodes nothing);
    // the result is cached, so the node does not probe again when it starts.
    if !config.games.is_empty() {
        if let Err(e) = crate::game::select::NodeEncoders::resolve(&config.encoder) {
            errors.push(ConfigError::new("encoder.encoder", e.to_string()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use nearpath_config::{NodeGatewayConfig, NodeIdentity};

    #[test]
    fn an_unreadable_or_empty_ca_file_is_refused_at_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut gateway = NodeGatewayConfig::pinned("127.0.0.1:4433", "ab".repeat(32));
        gateway.pinned_cert_sha256 = None;
        gateway.ca_file = Some(dir.path().join("missing.pem"));
        let node = NodeIdentity {
            id: "n".into(),
            enrolment_token: Some("t".into()),
        };
        let mut cfg = NodeConfig::new(node, gateway);
        let errors = preflight(&cfg);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "gateway.ca_file");
        assert!(errors[0].message.contains("missing.pem"), "{errors:?}");

        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        cfg.gateway.ca_file = Some(dir.path().join("empty.pem"));
        assert_eq!(preflight(&cfg).len(), 1);

        let s = nearpath_protocol::tls::self_signed(&["localhost".to_string()]).unwrap();
        std::fs::write(dir.path().join("ca.pem"), &s.cert_pem).unwrap();
        cfg.gateway.ca_file = Some(dir.path().join("ca.pem"));
        assert_eq!(preflight(&cfg), Vec::new());
    }

    #[cfg(feature = "libav")]
    #[test]
    fn an_explicit_encoder_that_does_not_open_here_is_refused_at_its_key() {
        let gateway = NodeGatewayConfig::pinned("127.0.0.1:4433", "ab".repeat(32));
        let node = NodeIdentity {
            id: "n".into(),
            enrolment_token: Some("t".into()),
        };
        let mut cfg = NodeConfig::new(node, gateway);
        cfg.encoder.encoder = nearpath_config::EncoderKind::Vaapi;
        cfg.encoder.vaapi_device = "/nonexistent/renderD128".into();
        // A node without games encodes nothing, so nothing is probed.
        assert_eq!(preflight(&cfg), Vec::new());
        cfg.games = vec![nearpath_config::GameEntry {
            title: "arena".into(),
            source: nearpath_config::GameSource::Builtin {},
        }];
        let errors = preflight(&cfg);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "encoder.encoder");
        assert!(
            errors[0].message.contains("/nonexistent/renderD128"),
            "the reason names the device: {errors:?}"
        );
    }
}
