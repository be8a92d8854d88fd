//! What an inference model can do beyond plain text generation, as nodes declare it.
//!
//! A node lists, per model, the optional OpenAI features its backend honours ([`ModelCaps`]); the
//! gateway refuses with a 400 naming the parameter a request that needs a feature no node serving
//! the model declares, instead of letting a backend silently ignore it. Plain chat and legacy
//! completions need no capability. On the wire the set is a varint bit mask (PROTOCOL.md,
//! `Register`); bits this build does not know are dropped on decode, so a newer node's extra
//! capabilities never make an older gateway promise something it cannot check.

/// A set of model capabilities (a bit mask).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ModelCaps(u32);

impl ModelCaps {
    /// No optional feature: plain chat and completions only.
    pub const NONE: ModelCaps = ModelCaps(0);
    /// `tools` / `tool_choice` (function calling), including streamed `tool_calls` deltas.
    pub const TOOLS: ModelCaps = ModelCaps(1);
    /// `response_format: {"type": "json_object"}` (JSON mode).
    pub const JSON_MODE: ModelCaps = ModelCaps(1 << 1);
    /// `response_format: {"type": "json_schema", ...}` (structured outputs).
    pub const JSON_SCHEMA: ModelCaps = ModelCaps(1 << 2);
    /// `logprobs` / `top_logprobs`.
    pub const LOGPROBS: ModelCaps = ModelCaps(1 << 3);
    /// `POST /v1/embeddings`.
    pub const EMBEDDINGS: ModelCaps = ModelCaps(1 << 4);
    /// `n > 1` (several choices per request).
    pub const MULTIPLE_CHOICES: ModelCaps = ModelCaps(1 << 5);
    /// Image content parts in chat messages.
    pub const VISION: ModelCaps = ModelCaps(1 << 6);

    /// Every capability with its configuration and API name, in bit order.
    pub const NAMED: [(ModelCaps, &'static str); 7] = [
        (ModelCaps::TOOLS, "tools"),
        (ModelCaps::JSON_MODE, "json_mode"),
        (ModelCaps::JSON_SCHEMA, "json_schema"),
        (ModelCaps::LOGPROBS, "logprobs"),
        (ModelCaps::EMBEDDINGS, "embeddings"),
        (ModelCaps::MULTIPLE_CHOICES, "n"),
        (ModelCaps::VISION, "vision"),
    ];

    const KNOWN_BITS: u32 = (1 << 7) - 1;

    /// The set from its wire bits; unknown bits are dropped.
    pub fn from_bits(bits: u64) -> ModelCaps {
        ModelCaps((bits & u64::from(Self::KNOWN_BITS)) as u32)
    }

    /// The wire bits.
    pub fn bits(self) -> u32 {
        self.0
    }

    /// The capability called `name` (`tools`, `json_mode`, `json_schema`, `logprobs`,
    /// `embeddings`, `n`, `vision`).
    pub fn from_name(name: &str) -> Option<ModelCaps> {
        Self::NAMED
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(c, _)| *c)
    }

    /// The set of the named capabilities; the first unknown name is the error.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<ModelCaps, String> {
        let mut caps = ModelCaps::NONE;
        for n in names {
            caps = caps.with(ModelCaps::from_name(n).ok_or_else(|| n.to_string())?);
        }
        Ok(caps)
    }

    /// The names of the capabilities in the set, in bit order.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMED
            .iter()
            .filter(|(c, _)| self.contains(*c))
            .map(|(_, n)| *n)
            .collect()
    }

    /// Whether every capability of `other` is in the set.
    pub fn contains(self, other: ModelCaps) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of both sets.
    pub fn with(self, other: ModelCaps) -> ModelCaps {
        ModelCaps(self.0 | other.0)
    }

    /// The capabilities of `other` missing from the set.
    pub fn missing(self, other: ModelCaps) -> ModelCaps {
        ModelCaps(other.0 & !self.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        let all = ModelCaps::from_names(ModelCaps::NAMED.iter().map(|(_, n)| *n)).expect("known");
        assert_eq!(all.names().len(), ModelCaps::NAMED.len());
        assert_eq!(ModelCaps::from_bits(u64::from(all.bits())), all);
        assert_eq!(
            ModelCaps::from_names(["tools", "telepathy"]),
            Err("telepathy".to_string())
        );
    }

    #[test]
    fn unknown_wire_bits_are_dropped_not_promised() {
        let c = ModelCaps::from_bits(u64::MAX);
        assert_eq!(c.names().len(), ModelCaps::NAMED.len());
        assert_eq!(c.bits(), ModelCaps::KNOWN_BITS);
    }

    #[test]
    fn missing_lists_what_a_set_lacks() {
        let have = ModelCaps::TOOLS.with(ModelCaps::LOGPROBS);
        let need = ModelCaps::TOOLS.with(ModelCaps::JSON_SCHEMA);
        assert_eq!(have.missing(need), ModelCaps::JSON_SCHEMA);
        assert!(have.contains(ModelCaps::TOOLS));
        assert!(!have.contains(need));
    }
}
