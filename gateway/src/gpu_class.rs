//! The gateway's own GPU classification: the export-control class of a node is derived here from
//! the GPU **model names** the node reports, never taken from the class string the node sends
//! (that string is a hint, logged when it disagrees).
//!
//! A model name is first normalised ([`normalize_model`]): Unicode fullwidth forms are folded to
//! ASCII (a small NFKC subset: U+FF01..U+FF5E and the ideographic space), ASCII case is folded,
//! every other character that is not an ASCII letter or digit separates tokens, and tokens that
//! say nothing about the chip are dropped: vendor and brand names (`NVIDIA`, `AMD`, `GeForce`,
//! `Tesla`, `Instinct`, `Radeon`, `Intel`, `Habana`, `Quadro`), form factors (`PCIe`, `SXM`,
//! `SXM4`, `SXM5`, `NVL`, `NVL72`, `OAM`), memory sizes and kinds (`80GB`, `HBM3`, `HBM3e`) and
//! filler words (`GPU`, `Accelerator`, `Generation`). The remaining tokens are joined without
//! separators into a key (`NVIDIA H100 80GB HBM3` and `ｈ100 PCIe` are both `h100`) and looked up
//! exactly in [`GPU_MODEL_TABLE`].
//!
//! Exact lookup (not substring matching) is deliberate: whatever the table does not know is
//! *unclassified* and treated as the most restricted class until an admin classifies it
//! (`POST /admin/gpu-models`), so a misspelt or invented model name fails closed.

/// The class reported for a model the table does not know and no admin has classified. Such a
/// GPU is checked against every class the geofence names, so it is as restricted as the most
/// restricted of them.
pub const UNCLASSIFIED: &str = "unclassified";

/// The class of a node without GPUs.
pub const CPU: &str = "cpu";

/// Model keys (after [`normalize_model`]) and their classes, for current data-centre,
/// workstation and consumer parts. The classes are the policy vocabulary of `[geofence]`
/// (`controlled_gpu_classes` and the rules' `gpu_classes`); the default controlled list holds
/// every class below that meets ECCN 3A090/4A090 (total processing performance of at least 4800,
/// or at least 1600 with a performance density of at least 5.92), following the vendors' data
/// sheets and NVIDIA's 8-K filings of 2022-10 and 2023-10 (A100, A800, H100, H800, L4, L40, L40S,
/// RTX 4090 named).
/// Variants of one die share a class: MI250/MI250X are `mi250`, MI300X/MI300A are `mi300`.
pub const GPU_MODEL_TABLE: &[(&str, &str)] = &[
    // NVIDIA data centre, Ampere / Hopper / Blackwell.
    ("a100", "a100"),
    ("a800", "a800"),
    ("h100", "h100"),
    ("h800", "h800"),
    ("h200", "h200"),
    ("h20", "h20"),
    ("gh200", "gh200"),
    ("b100", "b100"),
    ("b200", "b200"),
    ("b300", "b300"),
    ("gb200", "gb200"),
    ("gb300", "gb300"),
    // NVIDIA data centre, Ada / Ampere inference and graphics.
    ("l40", "l40"),
    ("l40s", "l40s"),
    ("l20", "l20"),
    ("l4", "l4"),
    ("l2", "l2"),
    ("a40", "a40"),
    ("a10", "a10"),
    ("a10g", "a10"),
    ("t4", "t4"),
    ("v100", "v100"),
    // NVIDIA workstation.
    ("rtx6000ada", "rtx6000ada"),
    ("rtxa1000", "rtxa1000"),
    // NVIDIA consumer.
    ("rtx5090", "rtx5090"),
    ("rtx4090", "rtx4090"),
    ("rtx4090d", "rtx4090d"),
    ("rtx4080", "rtx4080"),
    ("rtx4080super", "rtx4080"),
    ("rtx3090", "rtx3090"),
    ("rtx3090ti", "rtx3090"),
    ("rtx3080", "rtx3080"),
    ("rtx3080ti", "rtx3080"),
    // AMD Instinct.
    ("mi250", "mi250"),
    ("mi250x", "mi250"),
    ("mi300x", "mi300"),
    ("mi300a", "mi300"),
    ("mi300", "mi300"),
    ("mi325x", "mi325x"),
    ("mi355x", "mi355x"),
    // Intel Gaudi (HL-225 is Gaudi 2's OAM module, HL-325 Gaudi 3's).
    ("gaudi2", "gaudi2"),
    ("hl225", "gaudi2"),
    ("hl225b", "gaudi2"),
    ("gaudi3", "gaudi3"),
    ("hl325", "gaudi3"),
    ("hl325l", "gaudi3"),
    // A GPU entry that names no GPU: the node runs on CPUs.
    ("cpu", "cpu"),
];

/// Tokens that name a vendor or brand, not a chip.
const VENDOR_TOKENS: &[&str] = &[
    "nvidia", "amd", "ati", "geforce", "tesla", "instinct", "radeon", "intel", "habana", "quadro",
];

/// Tokens that carry no information about the chip.
const FILLER_TOKENS: &[&str] = &[
    "gpu",
    "accelerator",
    "ai",
    "generation",
    "graphics",
    "card",
    "module",
    "tensor",
    "core",
];

/// Form-factor suffixes that may also be glued to the model (`H100PCIe`, `A100-SXM4`).
const FORM_FACTOR_SUFFIXES: &[&str] = &[
    "pcie", "sxm5", "sxm4", "sxm3", "sxm2", "sxm", "nvl", "oam", "hgx", "dgx",
];

/// Folds fullwidth ASCII variants (U+FF01..U+FF5E) and the ideographic space to ASCII, as NFKC
/// would; every other character is returned unchanged.
fn fold_width(c: char) -> char {
    match c as u32 {
        0xFF01..=0xFF5E => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        0x3000 => ' ',
        _ => c,
    }
}

/// Whether a token is a memory size (`80gb`, `141g`, `24gib`) or kind (`hbm3e`, `gddr6x`).
fn is_memory_token(t: &str) -> bool {
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    let (num, unit) = t.split_at(digits);
    if !num.is_empty() && matches!(unit, "g" | "gb" | "gib" | "t" | "tb") {
        return true;
    }
    ["hbm", "gddr", "lpddr"].iter().any(|kind| {
        t.strip_prefix(kind).is_some_and(|rest| {
            rest.bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'e' | b'x'))
        })
    })
}

/// Whether a token is a form factor (`pcie`, `sxm5`, `nvl72`).
fn is_form_factor_token(t: &str) -> bool {
    FORM_FACTOR_SUFFIXES.contains(&t)
        || t.strip_prefix("nvl")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The lookup key of a model name (see the module docs); empty when nothing is left.
pub fn normalize_model(model: &str) -> String {
    let folded: String = model
        .chars()
        .map(fold_width)
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    let mut key = String::new();
    for token in folded.split(' ').filter(|t| !t.is_empty()) {
        if VENDOR_TOKENS.contains(&token)
            || FILLER_TOKENS.contains(&token)
            || is_memory_token(token)
            || is_form_factor_token(token)
        {
            continue;
        }
        key.push_str(token);
    }
    // Form factors glued to the model name (`h100pcie`, `a100sxm4`): strip them from the end,
    // but never down to nothing.
    loop {
        let stripped = FORM_FACTOR_SUFFIXES
            .iter()
            .find_map(|s| key.strip_suffix(s).filter(|rest| !rest.is_empty()));
        match stripped {
            Some(rest) => key.truncate(rest.len()),
            None => break,
        }
    }
    key
}

/// The class of a normalised model key from the built-in table, if it has one.
pub fn builtin_class(key: &str) -> Option<&'static str> {
    GPU_MODEL_TABLE
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, class)| *class)
}

/// How one reported GPU was classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// The model name as the node reported it.
    pub model: String,
    /// Its normalised key.
    pub key: String,
    /// The derived class; [`UNCLASSIFIED`] when neither an admin override nor the table knew it.
    pub class: String,
    /// Where the class came from: `admin`, `table` or `none`.
    pub source: &'static str,
}

/// Classifies a model: an admin override (looked up by key) wins over the built-in table;
/// without either the model is [`UNCLASSIFIED`].
pub fn classify(model: &str, admin_override: impl FnOnce(&str) -> Option<String>) -> Classified {
    let key = normalize_model(model);
    let (class, source) = if key.is_empty() {
        (UNCLASSIFIED.to_string(), "none")
    } else if let Some(c) = admin_override(&key) {
        (c, "admin")
    } else if let Some(c) = builtin_class(&key) {
        (c.to_string(), "table")
    } else {
        (UNCLASSIFIED.to_string(), "none")
    };
    Classified {
        model: model.to_string(),
        key,
        class,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(model: &str) -> String {
        classify(model, |_| None).class
    }

    #[test]
    fn reported_model_names_map_to_their_class() {
        let cases: &[(&str, &str)] = &[
            ("NVIDIA A100-SXM4-80GB", "a100"),
            ("NVIDIA A100 80GB PCIe", "a100"),
            ("A100-PCIE-40GB", "a100"),
            ("NVIDIA A800-SXM4-80GB", "a800"),
            ("NVIDIA A800 80GB PCIe", "a800"),
            ("NVIDIA H100 80GB HBM3", "h100"),
            ("NVIDIA H100 PCIe", "h100"),
            ("H100 PCIe", "h100"),
            ("NVIDIA H100 NVL", "h100"),
            ("H100-SXM5-80GB", "h100"),
            ("h100pcie", "h100"),
            ("NVIDIA H800", "h800"),
            ("NVIDIA H800 PCIe", "h800"),
            ("NVIDIA H200", "h200"),
            ("NVIDIA H200 NVL", "h200"),
            ("NVIDIA H200 141GB HBM3e", "h200"),
            ("NVIDIA H20", "h20"),
            ("NVIDIA GH200 480GB", "gh200"),
            ("NVIDIA B100", "b100"),
            ("NVIDIA B200", "b200"),
            ("NVIDIA B200 180GB HBM3e", "b200"),
            ("NVIDIA B300", "b300"),
            ("b300", "b300"),
            ("NVIDIA GB200", "gb200"),
            ("GB200 NVL72", "gb200"),
            ("NVIDIA GB300", "gb300"),
            ("NVIDIA L40", "l40"),
            ("NVIDIA L40S", "l40s"),
            ("NVIDIA L20", "l20"),
            ("NVIDIA L4", "l4"),
            ("NVIDIA L2", "l2"),
            ("NVIDIA A40", "a40"),
            ("NVIDIA A10", "a10"),
            ("NVIDIA A10G", "a10"),
            ("Tesla T4", "t4"),
            ("Tesla V100-SXM2-32GB", "v100"),
            ("NVIDIA RTX 6000 Ada Generation", "rtx6000ada"),
            ("NVIDIA RTX A1000", "rtxa1000"),
            ("NVIDIA GeForce RTX 4090", "rtx4090"),
            ("NVIDIA GeForce RTX 4090 D", "rtx4090d"),
            ("GeForce RTX 4090D", "rtx4090d"),
            ("NVIDIA GeForce RTX 5090", "rtx5090"),
            ("NVIDIA GeForce RTX 4080", "rtx4080"),
            ("NVIDIA GeForce RTX 3080", "rtx3080"),
            ("NVIDIA GeForce RTX 3080 Ti", "rtx3080"),
            ("NVIDIA GeForce RTX 3090", "rtx3090"),
            ("AMD Instinct MI250X", "mi250"),
            ("AMD Instinct MI250", "mi250"),
            ("AMD Instinct MI300X", "mi300"),
            ("AMD Instinct MI300X OAM", "mi300"),
            ("AMD Instinct MI300A", "mi300"),
            ("AMD Instinct MI325X", "mi325x"),
            ("AMD Instinct MI355X", "mi355x"),
            ("Intel Gaudi 2", "gaudi2"),
            ("Habana Gaudi2", "gaudi2"),
            ("HL-225", "gaudi2"),
            ("Intel Gaudi 3 AI Accelerator", "gaudi3"),
            ("HL-325L", "gaudi3"),
            ("cpu", "cpu"),
        ];
        for (model, want) in cases {
            assert_eq!(class_of(model), *want, "model {model:?}");
        }
    }

    #[test]
    fn case_width_spacing_and_punctuation_do_not_change_the_class() {
        let cases: &[(&str, &str)] = &[
            ("ｈ１００", "h100"),
            ("ｈ100", "h100"),
            ("Ｈ１００\u{3000}ＰＣＩｅ", "h100"),
            ("ＮＶＩＤＩＡ　Ｂ３００", "b300"),
            ("  h-100  ", "h100"),
            ("H_100", "h100"),
            ("h.100/pcie", "h100"),
            ("RTX-4090", "rtx4090"),
            ("rtx4090", "rtx4090"),
            ("MI 300 X", "mi300"),
        ];
        for (model, want) in cases {
            assert_eq!(class_of(model), *want, "model {model:?}");
        }
    }

    #[test]
    fn unknown_or_evasive_names_are_unclassified() {
        // Whatever the table does not know fails closed, including homoglyphs (Cyrillic Н),
        // mathematical letters and names reduced to nothing.
        for model in [
            "unknown",
            "",
            "   ",
            "NVIDIA",
            "PCIe 80GB",
            "Н100",
            "\u{1D407}100",
            "h100x",
            "Acme Turbo 9000",
            "gpu",
        ] {
            assert_eq!(class_of(model), UNCLASSIFIED, "model {model:?}");
        }
    }

    #[test]
    fn the_node_class_string_is_not_used_but_admin_overrides_win() {
        let c = classify("Acme Turbo 9000", |k| {
            (k == "acmeturbo9000").then(|| "rtx3080".to_string())
        });
        assert_eq!((c.class.as_str(), c.source), ("rtx3080", "admin"));
        let c = classify("NVIDIA H100 PCIe", |_| None);
        assert_eq!((c.key.as_str(), c.source), ("h100", "table"));
    }

    #[test]
    fn every_table_key_is_its_own_normal_form_and_every_class_a_class_name() {
        for (key, class) in GPU_MODEL_TABLE {
            assert_eq!(normalize_model(key), *key);
            assert!(nearpath_config::is_gpu_class_name(class), "{class}");
        }
        let mut keys: Vec<_> = GPU_MODEL_TABLE.iter().map(|(k, _)| *k).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), GPU_MODEL_TABLE.len(), "duplicate keys");
    }

    #[test]
    fn default_controlled_list_covers_the_controlled_parts() {
        let controlled = nearpath_config::default_controlled_gpu_classes();
        for class in [
            "a100",
            "a800",
            "h100",
            "h800",
            "h200",
            "h20",
            "gh200",
            "b100",
            "b200",
            "b300",
            "gb200",
            "gb300",
            "l40",
            "l40s",
            "l4",
            "rtx4090",
            "rtx5090",
            "rtx6000ada",
            "mi250",
            "mi300",
            "mi325x",
            "mi355x",
            "gaudi2",
            "gaudi3",
        ] {
            assert!(
                controlled.iter().any(|c| c == class),
                "{class} not controlled"
            );
        }
        for class in [
            "rtx3080", "rtx3090", "rtx4080", "rtx4090d", "l20", "l2", "a40", "a10", "t4", "cpu",
        ] {
            assert!(!controlled.iter().any(|c| c == class), "{class} controlled");
        }
    }
}
