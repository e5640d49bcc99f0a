//! The node's billing configuration: `tokenomy.toml` (prices per model, grants, timeouts),
//! with every value overridable by environment variables.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokenomy_ledger::Price;

/// The configuration shipped with tokenomy; written to `DATA_DIR/tokenomy.toml` on first start.
pub const DEFAULT_CONFIG_TOML: &str = include_str!("../tokenomy.toml");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    pub input_micros_per_mtok: i64,
    pub cached_input_micros_per_mtok: i64,
    pub output_micros_per_mtok: i64,
}

impl From<PriceConfig> for Price {
    fn from(p: PriceConfig) -> Price {
        Price {
            input_micros_per_mtok: p.input_micros_per_mtok,
            cached_input_micros_per_mtok: p.cached_input_micros_per_mtok,
            output_micros_per_mtok: p.output_micros_per_mtok,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub default: PriceConfig,
    #[serde(default)]
    pub models: BTreeMap<String, PriceConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BillingSettings {
    pub first_run_grant_micros: i64,
    pub hold_timeout_ms: i64,
    pub expire_interval_ms: u64,
    pub checkpoint_interval_ms: u64,
    /// Added after the first release: files written before it lack it.
    #[serde(default = "default_ledger_timeout_ms")]
    pub ledger_timeout_ms: u64,
}

fn default_ledger_timeout_ms() -> u64 {
    tokenomy_ledger::any::PG_OPERATION_TIMEOUT_MS
}

/// A closed API's list price, to show what the tokens served here would have cost there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferencePrice {
    /// The closed model it prices, as people know it (`gpt-4o-mini`).
    pub name: String,
    pub input_micros_per_mtok: i64,
    pub cached_input_micros_per_mtok: i64,
    pub output_micros_per_mtok: i64,
}

impl ReferencePrice {
    pub fn price(&self) -> Price {
        Price {
            input_micros_per_mtok: self.input_micros_per_mtok,
            cached_input_micros_per_mtok: self.cached_input_micros_per_mtok,
            output_micros_per_mtok: self.output_micros_per_mtok,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub billing: BillingSettings,
    pub prices: Prices,
    /// Added after the first release: files written before it lack it (and show no savings).
    #[serde(default)]
    pub reference: Option<ReferencePrice>,
}

impl NodeConfig {
    /// Parses TOML, then applies `TOKENOMY_PRICES__*` / `TOKENOMY_BILLING__*` overrides from `env`.
    pub fn parse(toml_text: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<NodeConfig, String> {
        let mut c: NodeConfig = toml::from_str(toml_text).map_err(|e| format!("tokenomy.toml: {e}"))?;
        for (k, v) in env {
            c.apply_env(&k, &v)?;
        }
        c.validate()?;
        Ok(c)
    }

    fn apply_env(&mut self, key: &str, value: &str) -> Result<(), String> {
        let parse = |v: &str| v.replace('_', "").parse::<i64>().map_err(|_| format!("{key}={value}: not an integer"));
        if let Some(rest) = key.strip_prefix("TOKENOMY_PRICES__") {
            let (model, field) = rest.split_once("__").ok_or_else(|| format!("{key}: expected TOKENOMY_PRICES__<MODEL>__<FIELD>"))?;
            // A variable's name cannot hold `.` or `-`: `QWEN2_5_CODER_0_5B` names
            // `qwen2.5-coder-0.5b` (its env form), whose tokenomy.toml price it then changes.
            let model = model.to_ascii_lowercase();
            let price = if model == "default" {
                &mut self.prices.default
            } else {
                let base = self.prices.default;
                let listed = self.prices.models.keys().find(|m| env_form(m) == model).cloned();
                self.prices.models.entry(listed.unwrap_or(model)).or_insert(base)
            };
            let n = parse(value)?;
            match field.to_ascii_lowercase().as_str() {
                "input_micros_per_mtok" => price.input_micros_per_mtok = n,
                "cached_input_micros_per_mtok" => price.cached_input_micros_per_mtok = n,
                "output_micros_per_mtok" => price.output_micros_per_mtok = n,
                f => return Err(format!("{key}: unknown price field {f}")),
            }
        } else if let Some(field) = key.strip_prefix("TOKENOMY_BILLING__") {
            let n = parse(value)?;
            let b = &mut self.billing;
            match field.to_ascii_lowercase().as_str() {
                "first_run_grant_micros" => b.first_run_grant_micros = n,
                "hold_timeout_ms" => b.hold_timeout_ms = n,
                "expire_interval_ms" => b.expire_interval_ms = n.max(0) as u64,
                "checkpoint_interval_ms" => b.checkpoint_interval_ms = n.max(0) as u64,
                "ledger_timeout_ms" => b.ledger_timeout_ms = n.max(0) as u64,
                f => return Err(format!("{key}: unknown billing field {f}")),
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), String> {
        let all = std::iter::once(("default", &self.prices.default)).chain(self.prices.models.iter().map(|(k, v)| (k.as_str(), v)));
        for (name, p) in all {
            if [p.input_micros_per_mtok, p.cached_input_micros_per_mtok, p.output_micros_per_mtok].iter().any(|x| *x < 0) {
                return Err(format!("price of {name}: prices must be >= 0"));
            }

        }
        if let Some(r) = &self.reference {
            let p = [r.input_micros_per_mtok, r.cached_input_micros_per_mtok, r.output_micros_per_mtok];
            if r.name.trim().is_empty() || p.iter().any(|x| *x < 0) {
                return Err("reference: a name and prices >= 0".into());
            }
        }
        let b = &self.billing;
        if !(1_000..=tokenomy_ledger::MAX_TIMEOUT_MS).contains(&b.hold_timeout_ms) {
            return Err(format!("hold_timeout_ms must be in 1000..={}", tokenomy_ledger::MAX_TIMEOUT_MS));
        }
        if !(0..=tokenomy_ledger::MAX_AMOUNT_MICROS).contains(&b.first_run_grant_micros) {
            return Err("first_run_grant_micros out of range".into());
        }
        if b.expire_interval_ms == 0 || b.checkpoint_interval_ms == 0 {
            return Err("intervals must be > 0".into());
        }
        if !(100..=600_000).contains(&b.ledger_timeout_ms) {
            return Err("ledger_timeout_ms must be in 100..=600000".into());
        }
        Ok(())
    }

    /// The price of `model`: its own entry, else the default list price.
    /// The prices a request for `model` pays (and its receipt states). A cached input token
    /// costs at most an input token: a request's hold prices every prompt token as input, so a
    /// dearer cached price (say, a model given only an input price, below the default's cached
    /// one) would make its cost exceed its hold.
    pub fn price(&self, model: &str) -> Price {
        let models = &self.prices.models;
        let listed = models.get(model).or_else(|| models.get(&env_form(model)));
        let mut p: Price = listed.copied().unwrap_or(self.prices.default).into();
        p.cached_input_micros_per_mtok = p.cached_input_micros_per_mtok.min(p.input_micros_per_mtok);
        p
    }
}

/// A model's name as a `TOKENOMY_PRICES__<MODEL>__…` variable spells it (lower-cased): every
/// character but ASCII letters and digits becomes `_`.
pub fn env_form(model: &str) -> String {
    model.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_parses_and_charges_by_default() {
        let c = NodeConfig::parse(DEFAULT_CONFIG_TOML, []).unwrap();
        let p = c.price("some-unlisted-model");
        assert!(p.input_micros_per_mtok > 0 && p.output_micros_per_mtok > 0);
        assert_eq!(c.price("smollm2").output_micros_per_mtok, 200_000);
        let r = c.reference.expect("the shipped file names a reference price");
        assert_eq!((r.name.as_str(), r.output_micros_per_mtok), ("gpt-4o-mini", 600_000));
        // A file written before the section existed still parses, with no reference.
        let old = DEFAULT_CONFIG_TOML.split("\n[reference]").next().unwrap();
        assert_eq!(NodeConfig::parse(old, []).unwrap().reference, None);
    }

    #[test]
    fn env_overrides_prices_and_settings() {
        let env = [
            ("TOKENOMY_PRICES__SMOLLM2__OUTPUT_MICROS_PER_MTOK".to_string(), "0".to_string()),
            ("TOKENOMY_PRICES__NEWMODEL__INPUT_MICROS_PER_MTOK".to_string(), "7".to_string()),
            ("TOKENOMY_BILLING__HOLD_TIMEOUT_MS".to_string(), "5_000".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = NodeConfig::parse(DEFAULT_CONFIG_TOML, env).unwrap();
        assert_eq!(c.price("smollm2").output_micros_per_mtok, 0);
        assert_eq!(c.price("newmodel").input_micros_per_mtok, 7);
        assert_eq!(c.price("newmodel").output_micros_per_mtok, c.prices.default.output_micros_per_mtok);
        // Given only an input price below the default's cached one, its cached tokens cost as much.
        assert!(c.prices.default.cached_input_micros_per_mtok > 7);
        assert_eq!(c.price("newmodel").cached_input_micros_per_mtok, 7);
        assert_eq!(c.billing.hold_timeout_ms, 5_000);
    }

    #[test]
    fn a_variable_names_a_model_with_dots_and_dashes_by_its_env_form() {
        let env = [
            // listed in the file as "qwen2.5-coder-0.5b": that entry changes, its other prices stay
            ("TOKENOMY_PRICES__QWEN2_5_CODER_0_5B__OUTPUT_MICROS_PER_MTOK".to_string(), "7".to_string()),
            // not listed: found by its env form when the node asks for "gemma3-270m"
            ("TOKENOMY_PRICES__GEMMA3_270M__INPUT_MICROS_PER_MTOK".to_string(), "3".to_string()),
        ];
        let c = NodeConfig::parse(DEFAULT_CONFIG_TOML, env).unwrap();
        let qwen = c.price("qwen2.5-coder-0.5b");
        assert_eq!((qwen.input_micros_per_mtok, qwen.output_micros_per_mtok), (100_000, 7));
        assert!(!c.prices.models.contains_key("qwen2_5_coder_0_5b"));
        assert_eq!(c.price("gemma3-270m").input_micros_per_mtok, 3);
        assert_eq!(c.price("gemma3-270m").output_micros_per_mtok, c.prices.default.output_micros_per_mtok);
        assert_eq!(env_form("Qwen2.5-Coder-0.5B"), "qwen2_5_coder_0_5b");
    }

    #[test]
    fn bad_values_are_refused() {
        let neg = [("TOKENOMY_PRICES__DEFAULT__INPUT_MICROS_PER_MTOK".to_string(), "-1".to_string())];
        assert!(NodeConfig::parse(DEFAULT_CONFIG_TOML, neg).unwrap_err().contains(">= 0"));
        let typo = [("TOKENOMY_PRICES__DEFAULT__INPUT".to_string(), "1".to_string())];
        assert!(NodeConfig::parse(DEFAULT_CONFIG_TOML, typo).unwrap_err().contains("unknown price field"));
        assert!(NodeConfig::parse("[billing]\nbogus = 1", []).is_err());

    }
}
