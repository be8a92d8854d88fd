//! Metering of inference requests: the methods of [`crate::components::Meter`].
//!
//! A tenant is billed what the gateway relayed, never what a node says; a node's own counts are
//! kept beside them, and a disagreement beyond the tolerance is an SLA penalty for the node, not
//! a charge.

use crate::budget::SpendBook;
use crate::clock::SharedClock;
use crate::metrics::labels;
use crate::metrics::Metrics;
use crate::registry::NodeEntry;
use crate::registry::Registry;
use crate::store::Store;
use crate::store::{ApiKey, UsageKind, UsageRecord};
use nearpath_protocol::openai::Usage;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::warn;

/// The usage ledger: what was served, to whom, by which node.
pub struct Meter {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub clock: SharedClock,
    /// How far a node's usage claims may be off before it is an SLA penalty.
    pub tolerance: UsageTolerance,
    /// The keys' spend this day and month: each committed record is added (the budgets read
    /// it; the same book as `Auth::spend`).
    pub spend: Arc<SpendBook>,
}

/// The penalty kind of a node whose usage claims disagree with the gateway's count.
pub const USAGE_MISMATCH: &str = "usage_mismatch";

/// How far a node's `Done` counts may be from the gateway's before it is a penalty:
/// `inference.usage_tolerance_percent` of the gateway's count, at least
/// `inference.usage_tolerance_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsageTolerance {
    pub percent: u32,
    pub tokens: u32,
}

impl UsageTolerance {
    pub fn from_config(c: &nearpath_config::InferenceConfig) -> UsageTolerance {
        UsageTolerance {
            percent: c.usage_tolerance_percent,
            tokens: c.usage_tolerance_tokens,
        }
    }

    fn allows(&self, counted: u32) -> u64 {
        (u64::from(counted) * u64::from(self.percent) / 100).max(u64::from(self.tokens))
    }

    /// The fields (`prompt`, `completion`) on which the node's claim is off by more than the
    /// tolerance, with (counted, claimed).
    pub fn mismatches(&self, billed: Usage, reported: Usage) -> Vec<(&'static str, u32, u32)> {
        [
            ("prompt", billed.prompt_tokens, reported.prompt_tokens),
            (
                "completion",
                billed.completion_tokens,
                reported.completion_tokens,
            ),
        ]
        .into_iter()
        .filter(|(_, counted, claimed)| {
            u64::from(counted.abs_diff(*claimed)) > self.allows(*counted)
        })
        .collect()
    }
}

/// What a finished request is metered as.
pub struct Metering<'a> {
    pub key: &'a ApiKey,
    pub request_id: &'a str,
    pub model: &'a str,
    pub api: &'static str,
    pub node: Option<&'a NodeEntry>,
    pub outcome: &'static str,
    /// What the tenant is billed (`InferStream::billed`).
    pub usage: Usage,
    /// What the node claimed (`InferStream::reported`); checked against `usage`.
    pub reported: Option<Usage>,
    pub ttft: Option<Duration>,
    pub started: Instant,
    pub bytes: u64,
}

impl Meter {
    /// Records metrics and appends the usage record. The append is durable (it is acknowledged
    /// only after its commit) but nobody waits for it: a client's answer must not wait for an
    /// fsync. `registry` answers whether the model is served (so that a client's model name
    /// becomes a metric label only when bounded) and takes a misreporting node's penalty.
    pub fn record_inference(&self, registry: &Registry, m: Metering<'_>) {
        let duration = self.clock.now().saturating_duration_since(m.started);
        let hot = &self.metrics.hot;
        hot.inference_requests
            .get(
                &self.metrics.inference_requests,
                [("api", m.api), ("outcome", m.outcome)],
            )
            .inc();
        let served = m
            .node
            .is_some_and(|n| n.workloads.models.iter().any(|x| x == m.model))
            || registry.serves_model(m.model);
        let model = self.metrics.model_label(m.model, served);
        if let Some(t) = m.ttft {
            hot.ttft_seconds
                .get(&self.metrics.ttft_seconds, [("model", &model)])
                .observe(t.as_secs_f64());
        }
        hot.tokens_out
            .get(&self.metrics.tokens_out, [("model", &model)])
            .inc_by(m.usage.completion_tokens as u64);
        if let (Some(node), Some(reported)) = (m.node, m.reported) {
            self.check_reported_usage(registry, node, m.request_id, m.usage, reported);
        }
        let record = UsageRecord {
            id: None,
            at_ms: self.clock.unix_ms(),
            kind: UsageKind::Inference,
            request_id: m.request_id.to_string(),
            tenant: m.key.tenant.clone(),
            api_key_id: m.key.id.clone(),
            node_id: m.node.map(|n| n.id.clone()).unwrap_or_default(),
            operator_id: m.node.map(|n| n.operator_id.clone()).unwrap_or_default(),
            workload: m.model.to_string(),
            outcome: m.outcome.to_string(),
            prompt_tokens: m.usage.prompt_tokens as u64,
            completion_tokens: m.usage.completion_tokens as u64,
            node_prompt_tokens: m.reported.map(|u| u64::from(u.prompt_tokens)),
            node_completion_tokens: m.reported.map(|u| u64::from(u.completion_tokens)),
            ttft_ms: m.ttft.map(|t| t.as_secs_f64() * 1000.0),
            duration_ms: duration.as_secs_f64() * 1000.0,
            // An inference request holds its GPU slot for its whole duration.
            gpu_seconds: if m.node.is_some() {
                duration.as_secs_f64()
            } else {
                0.0
            },
            frames: 0,
            bytes: m.bytes,
        };
        let spend = self.spend.clone();
        let (key, model, at_ms) = (
            record.api_key_id.clone(),
            record.workload.clone(),
            record.at_ms,
        );
        let (prompt, completion) = (record.prompt_tokens, record.completion_tokens);
        // Nobody waits for the commit (see above), and no thread is held waiting for it either:
        // the store runs this once the record is committed.
        self.store.clone().append_usage_then(
            record,
            Box::new(move |result| match result {
                // Spend is what the ledger holds: counted once committed, as a restart would
                // count it from the store.
                Ok(_) => spend.add(&key, &model, at_ms, prompt, completion),
                Err(e) => warn!(error = %e, "usage record not written"),
            }),
        );
    }

    /// Compares a node's `Done` counts with the gateway's. A disagreement beyond the tolerance
    /// is an SLA penalty for the node (`usage_mismatch`), durable and counted in the node's live
    /// routing score; the tenant is billed the gateway's count either way.
    fn check_reported_usage(
        &self,
        registry: &Registry,
        node: &NodeEntry,
        request_id: &str,
        billed: Usage,
        reported: Usage,
    ) {
        let off = self.tolerance.mismatches(billed, reported);
        if off.is_empty() {
            return;
        }
        for (field, _, _) in &off {
            self.metrics
                .usage_mismatches
                .get_or_create(&labels([("field", field)]))
                .inc();
        }
        let detail = format!(
            "request {request_id}: {}",
            off.iter()
                .map(|(field, counted, claimed)| format!(
                    "{field} tokens: node said {claimed}, gateway counted {counted}"
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        warn!(node = %node.id, %detail, "node misreported usage: penalty");
        self.metrics
            .penalties
            .get_or_create(&labels([("kind", USAGE_MISMATCH)]))
            .inc();
        // The live score reacts now; the durable record feeds the score at the next registration.
        {
            let mut d = node.dynamic();
            d.recent_penalties = d.recent_penalties.saturating_add(1);
        }
        registry.refresh(node);
        let store = self.store.clone();
        let (id, operator) = (node.id.clone(), node.operator_id.clone());
        let at_ms = self.clock.unix_ms();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.record_penalty(&id, &operator, at_ms, USAGE_MISMATCH, 0, &detail)
            {
                warn!(error = %e, "usage mismatch penalty not recorded");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u32, completion: u32) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
        }
    }

    #[test]
    fn a_node_claiming_more_than_the_tolerance_is_a_mismatch_on_that_field_only() {
        let t = UsageTolerance {
            percent: 10,
            tokens: 2,
        };
        // 100 counted: 10 % is 10 tokens of slack.
        assert!(t.mismatches(usage(100, 100), usage(108, 110)).is_empty());
        assert_eq!(
            t.mismatches(usage(100, 100), usage(100, 111)),
            vec![("completion", 100, 111)]
        );
        // Small counts get the token floor.
        assert!(t.mismatches(usage(3, 1), usage(5, 3)).is_empty());
        assert_eq!(
            t.mismatches(usage(3, 1), usage(6, 1)),
            vec![("prompt", 3, 6)]
        );
    }
}
