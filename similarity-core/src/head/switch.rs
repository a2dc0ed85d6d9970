//! `SwitchHead`: routes each row to one of several heads (Quaterion's `SwitchHead`).
//!
//! Quaterion pairs it with a `SwitchEncoder`: every row of a batch was embedded by one of
//! several encoders, and `meta[i]["encoder"]` names it. Here the route is explicit: a
//! per-row index into [`SwitchHead::keys`] (the option names in sorted order). With
//! `h_k` the sub-head for key `k` and `x̃ = dropout(x)`:
//!
//! ```text
//! y[i] = h_{route[i]}.transform(x̃[i])
//! ```
//!
//! Rows are gathered per key, each group goes through its head in one batch, and the
//! outputs are put back in the input's row order. As in Quaterion the sub-heads' own
//! input dropout is not applied (only their `transform`), and every sub-head must have
//! the same output size. Shapes: `(batch, d)` → `(batch, output_size)`.
//!
//! Use:
//! * [`SwitchHead::forward_routed`] with `route: &[usize]` (one index per row), or
//!   [`SwitchHead::forward_keys`] with the key of each row;
//! * [`Head::forward`], which has no routing information (this is how
//!   `#[trainable_model]` calls a head), sends every row to `default_route`, and fails
//!   naming that option when it is not set.
//!
//! Defaults: `options` is required (at least one head; `Default` leaves it empty and `new`
//! rejects that), `default_route = None`, `dropout = 0` (Quaterion's is fixed at 0).
//!
//! Variables: each sub-head's under its key, `<key>.<name>` (`a.gates`, `b.fc_0.weight`),
//! Quaterion's state-dict names.

use std::collections::BTreeMap;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    EmptyHead, EmptyHeadConfig, GatedHead, GatedHeadConfig, Head, LinearHead, LinearHeadConfig,
    Plan, SequentialHead, SequentialHeadConfig, SkipConnectionHead, SkipConnectionHeadConfig,
    SoftmaxEmbeddingsHead, SoftmaxEmbeddingsHeadConfig, StackedProjectionHead,
    StackedProjectionHeadConfig, WideningHead, WideningHeadConfig, check_dropout, check_input,
};
use crate::error::{Error, Result};
use crate::limits::{self, ParamCount};
use crate::nn::{Mode, ParamScope, dropout};

/// A sub-head of a [`SwitchHead`]: one of the built-in heads with its options,
/// serialised as `{"GatedHead": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum SwitchOption {
    /// [`EmptyHead`].
    EmptyHead(EmptyHeadConfig),
    /// [`GatedHead`].
    GatedHead(GatedHeadConfig),
    /// [`LinearHead`].
    LinearHead(LinearHeadConfig),
    /// [`SkipConnectionHead`].
    SkipConnectionHead(SkipConnectionHeadConfig),
    /// [`SoftmaxEmbeddingsHead`].
    SoftmaxEmbeddingsHead(SoftmaxEmbeddingsHeadConfig),
    /// [`StackedProjectionHead`].
    StackedProjectionHead(StackedProjectionHeadConfig),
    /// [`WideningHead`].
    WideningHead(WideningHeadConfig),
    /// [`SequentialHead`].
    SequentialHead(SequentialHeadConfig),
}

/// Options of [`SwitchHead`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchHeadConfig {
    /// The heads by key (Quaterion's `options`). Required, at least one. Keys must be
    /// non-empty and contain no `.`.
    pub options: BTreeMap<String, SwitchOption>,
    /// The key [`Head::forward`] sends every row to. Default `None` (it then fails).
    pub default_route: Option<String>,
    /// Dropout on the input before routing. Default 0.
    pub dropout: f64,
}

#[derive(Debug, Clone)]
enum SubHead {
    /// The identity (an `EmptyHead`'s `transform`); its options are checked by `plan`.
    Empty,
    Gated(GatedHead),
    Linear(LinearHead),
    Skip(SkipConnectionHead),
    Softmax(SoftmaxEmbeddingsHead),
    Stacked(StackedProjectionHead),
    Widening(WideningHead),
    Sequential(SequentialHead),
}

impl SubHead {
    fn new(size: usize, option: &SwitchOption, params: &mut ParamScope) -> Result<Self> {
        Ok(match option.clone() {
            SwitchOption::EmptyHead(_) => SubHead::Empty,
            SwitchOption::GatedHead(c) => SubHead::Gated(GatedHead::new(size, c, params)?),
            SwitchOption::LinearHead(c) => SubHead::Linear(LinearHead::new(size, c, params)?),
            SwitchOption::SkipConnectionHead(c) => {
                SubHead::Skip(SkipConnectionHead::new(size, c, params)?)
            }
            SwitchOption::SoftmaxEmbeddingsHead(c) => {
                SubHead::Softmax(SoftmaxEmbeddingsHead::new(size, c, params)?)
            }
            SwitchOption::StackedProjectionHead(c) => {
                SubHead::Stacked(StackedProjectionHead::new(size, c, params)?)
            }
            SwitchOption::WideningHead(c) => SubHead::Widening(WideningHead::new(size, c, params)?),
            SwitchOption::SequentialHead(c) => {
                SubHead::Sequential(SequentialHead::new(size, c, params)?)
            }
        })
    }

    fn plan(size: usize, option: &SwitchOption) -> Result<Plan> {
        match option {
            SwitchOption::EmptyHead(c) => EmptyHead::plan(size, c),
            SwitchOption::GatedHead(c) => GatedHead::plan(size, c),
            SwitchOption::LinearHead(c) => LinearHead::plan(size, c),
            SwitchOption::SkipConnectionHead(c) => SkipConnectionHead::plan(size, c),
            SwitchOption::SoftmaxEmbeddingsHead(c) => SoftmaxEmbeddingsHead::plan(size, c),
            SwitchOption::StackedProjectionHead(c) => StackedProjectionHead::plan(size, c),
            SwitchOption::WideningHead(c) => WideningHead::plan(size, c),
            SwitchOption::SequentialHead(c) => SequentialHead::plan(size, c),
        }
    }

    fn transform(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        match self {
            SubHead::Empty => Ok(x.clone()),
            SubHead::Gated(h) => h.transform(x),
            SubHead::Linear(h) => h.transform(x),
            SubHead::Skip(h) => h.transform(x, mode),
            SubHead::Softmax(h) => h.transform(x),
            SubHead::Stacked(h) => h.transform(x),
            SubHead::Widening(h) => h.transform(x),
            SubHead::Sequential(h) => h.transform(x, mode),
        }
    }
}

/// Per-row choice among heads; see the module docs.
#[derive(Debug, Clone)]
pub struct SwitchHead {
    config: SwitchHeadConfig,
    size: usize,
    out: usize,
    keys: Vec<String>,
    heads: Vec<SubHead>,
    default_route: Option<usize>,
}

#[diagnostic::do_not_recommend]
impl Head for SwitchHead {
    type Config = SwitchHeadConfig;
    const NAME: &'static str = "SwitchHead";

    fn new(input_size: usize, config: Self::Config, params: &mut ParamScope) -> Result<Self> {
        let out = Self::plan(input_size, &config)?.output_size;
        let mut keys = Vec::new();
        let mut heads = Vec::new();
        for (key, option) in &config.options {
            heads.push(SubHead::new(input_size, option, &mut params.scope(key))?);
            keys.push(key.clone());
        }
        let default_route = config
            .default_route
            .as_ref()
            .and_then(|k| keys.iter().position(|key| key == k));
        Ok(SwitchHead {
            config,
            size: input_size,
            out,
            keys,
            heads,
            default_route,
        })
    }

    fn check_config(input_size: usize, config: &Self::Config) -> Result<()> {
        Self::plan(input_size, config).map(drop)
    }

    fn config(&self) -> &Self::Config {
        &self.config
    }

    fn input_size(&self) -> usize {
        self.size
    }

    fn output_size(&self) -> usize {
        self.out
    }

    fn forward(&self, x: &Tensor, mode: &mut Mode) -> Result<Tensor> {
        let Some(route) = self.default_route else {
            return Err(Error::invalid(
                "SwitchHead option `default_route`",
                "is not set, so `forward` cannot route rows; set it or call `forward_routed`",
            ));
        };
        check_input(x, self.size, Self::NAME)?;
        let rows = x.dim(0)?;
        self.forward_routed(x, &vec![route; rows], mode)
    }
}

impl SwitchHead {
    /// The output size and parameter count for `config` on inputs of `input_size`, every
    /// option checked first (see [`Head::check_config`]).
    pub(crate) fn plan(input_size: usize, config: &SwitchHeadConfig) -> Result<Plan> {
        check_dropout(Self::NAME, "dropout", config.dropout)?;
        if config.options.is_empty() {
            return Err(Error::invalid(
                "SwitchHead option `options`",
                "is required: give at least one head",
            ));
        }
        if config.options.len() > limits::MAX_LAYERS {
            return Err(Error::invalid(
                "SwitchHead option `options`",
                format!(
                    "must have at most {} heads, got {}",
                    limits::MAX_LAYERS,
                    config.options.len()
                ),
            ));
        }
        let mut params = ParamCount::new(Self::NAME);
        let mut first: Option<(&str, usize)> = None;
        for (key, option) in &config.options {
            if key.is_empty() || key.contains('.') {
                return Err(Error::invalid(
                    "SwitchHead option `options`",
                    format!("key `{key}` must be non-empty and contain no `.`"),
                ));
            }
            let plan = SubHead::plan(input_size, option).map_err(|e| in_option(key, e))?;
            params.add_count(&plan.params)?;
            match first {
                None => first = Some((key, plan.output_size)),
                Some((k0, out)) if out != plan.output_size => {
                    return Err(Error::invalid(
                        "SwitchHead option `options`",
                        format!(
                            "every head must have the same output size: `{k0}` gives {out}, `{key}` gives {}",
                            plan.output_size
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if let Some(k) = &config.default_route
            && !config.options.contains_key(k)
        {
            let keys: Vec<&str> = config.options.keys().map(String::as_str).collect();
            return Err(Error::invalid(
                "SwitchHead option `default_route`",
                format!("`{k}` is not a key of `options` ({})", keys.join(", ")),
            ));
        }
        Ok(Plan {
            output_size: first.map_or(0, |(_, out)| out),
            params,
        })
    }

    /// The option keys, in sorted order: the values of a route index into this.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// The route index of `key`, if it is one of the options.
    pub fn route_of(&self, key: &str) -> Option<usize> {
        self.keys.iter().position(|k| k == key)
    }

    /// `(batch, d)` → `(batch, output_size)`, row `i` through the head `keys()[route[i]]`.
    pub fn forward_routed(&self, x: &Tensor, route: &[usize], mode: &mut Mode) -> Result<Tensor> {
        check_input(x, self.size, Self::NAME)?;
        let rows = x.dim(0)?;
        if route.len() != rows {
            return Err(Error::invalid(
                "SwitchHead route",
                format!("has {} entries for {rows} rows", route.len()),
            ));
        }
        if let Some(bad) = route.iter().find(|&&r| r >= self.heads.len()) {
            return Err(Error::invalid(
                "SwitchHead route",
                format!("index {bad} is not below the {} options", self.heads.len()),
            ));
        }
        let x = dropout(x, self.config.dropout, mode)?;
        let mut outputs = Vec::new();
        let mut order: Vec<u32> = Vec::with_capacity(rows);
        for (k, head) in self.heads.iter().enumerate() {
            let idx: Vec<u32> = (0..rows as u32)
                .filter(|&i| route[i as usize] == k)
                .collect();
            if idx.is_empty() {
                continue;
            }
            let idx_t = Tensor::new(idx.as_slice(), x.device())?;
            outputs.push(head.transform(&x.index_select(&idx_t, 0)?, mode)?);
            order.extend(idx);
        }
        let stacked = Tensor::cat(&outputs, 0)?;
        if order.iter().enumerate().all(|(i, &r)| i as u32 == r) {
            return Ok(stacked);
        }
        // `stacked[j]` is input row `order[j]`; invert the permutation to restore order.
        let mut inverse = vec![0u32; rows];
        for (j, &r) in order.iter().enumerate() {
            inverse[r as usize] = j as u32;
        }
        let inverse = Tensor::new(inverse.as_slice(), x.device())?;
        Ok(stacked.index_select(&inverse, 0)?)
    }

    /// As [`SwitchHead::forward_routed`], with each row's key (Quaterion's
    /// `meta[i]["encoder"]`); an unknown key is an error listing the valid ones.
    pub fn forward_keys(&self, x: &Tensor, keys: &[&str], mode: &mut Mode) -> Result<Tensor> {
        let route = keys
            .iter()
            .map(|k| {
                self.route_of(k).ok_or_else(|| {
                    Error::invalid(
                        "SwitchHead route",
                        format!("unknown key `{k}`; options: {}", self.keys.join(", ")),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.forward_routed(x, &route, mode)
    }
}

/// An error of the sub-head `key`, with the key in its location.
fn in_option(key: &str, e: Error) -> Error {
    match e {
        Error::InvalidInput { location, message } => Error::invalid(
            format!("SwitchHead option `options.{key}` ({location})"),
            message,
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::Params;
    use candle_core::Device;

    fn head(p: &mut Params, default_route: Option<&str>) -> SwitchHead {
        let mut options = BTreeMap::new();
        options.insert("a".into(), SwitchOption::GatedHead(Default::default()));
        options.insert("b".into(), SwitchOption::EmptyHead(Default::default()));
        let config = SwitchHeadConfig {
            options,
            default_route: default_route.map(str::to_string),
            dropout: 0.0,
        };
        SwitchHead::new(2, config, &mut p.scope("head")).unwrap()
    }

    #[test]
    fn rows_keep_their_order_and_go_to_their_head() {
        let mut p = Params::new(&Device::Cpu, 0);
        let h = head(&mut p, None);
        assert_eq!(h.keys(), ["a", "b"]);
        assert!(p.named_vars().contains_key("head.a.gates"));
        let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &Device::Cpu).unwrap();
        let y = h
            .forward_keys(&x, &["b", "a", "b"], &mut Mode::Eval)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let t = 2f32.tanh();
        assert_eq!(y[0], [1.0, 2.0]);
        assert!((y[1][0] - 3.0 * t).abs() < 1e-6 && (y[1][1] - 4.0 * t).abs() < 1e-6);
        assert_eq!(y[2], [5.0, 6.0]);
        let e = h.forward(&x, &mut Mode::Eval).unwrap_err().to_string();
        assert!(e.contains("default_route"), "{e}");
        let e = h
            .forward_keys(&x, &["a", "c", "a"], &mut Mode::Eval)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`c`") && e.contains("a, b"), "{e}");
    }

    #[test]
    fn default_route_serves_forward() {
        let mut p = Params::new(&Device::Cpu, 0);
        let h = head(&mut p, Some("b"));
        let x = Tensor::new(&[[1.0f32, 2.0]], &Device::Cpu).unwrap();
        let y = h.forward(&x, &mut Mode::Eval).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), [[1.0, 2.0]]);
        let json = serde_json::to_string(h.config()).unwrap();
        assert!(json.contains("\"GatedHead\""), "{json}");
        let back: SwitchHeadConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(&back, h.config());
    }
}
