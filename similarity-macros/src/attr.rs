//! Parsing of the struct options `#[trainable_model(...)]` and of the field attributes
//! `#[encoder(...)]`, `#[head(...)]`, `#[loss(...)]`, `#[xbm(...)]` and `#[metric(...)]`.
//!
//! `#[encoder]` takes the options this macro interprets itself (`cache`, `key`, `input`);
//! `#[head]`, `#[loss]`, `#[xbm]` and `#[metric]` take `name = value` pairs that become
//! field assignments on the component's typed `Config` (or on the metric itself), so the
//! compiler checks names and value types; `#[metric]` also takes the flag `prog_bar`.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, Ident, LitStr, Path};

use crate::ctxt::Ctxt;

/// The cache types of `#[encoder(cache = "...")]`.
pub const CACHE_TYPES: [&str; 4] = ["auto", "cpu", "gpu", "none"];

/// The field roles, as attribute names.
pub const ROLES: [&str; 5] = ["encoder", "head", "loss", "xbm", "metric"];

/// The options of `#[trainable_model(...)]`.
const MODEL_OPTIONS: [&str; 2] = ["optimizer", "record"];

/// The options of `#[encoder(...)]`.
const ENCODER_OPTIONS: [&str; 3] = ["cache", "key", "input"];

/// Attributes of the language and of common derives, which are never a misspelt role.
const KNOWN_ATTRIBUTES: [&str; 14] = [
    "doc",
    "cfg",
    "cfg_attr",
    "allow",
    "warn",
    "deny",
    "forbid",
    "expect",
    "deprecated",
    "must_use",
    "serde",
    "default",
    "diagnostic",
    "inline",
];

/// What a field is.
pub enum Role {
    Encoder(EncoderAttr),
    Head(ComponentAttr),
    Loss(ComponentAttr),
    Xbm(ComponentAttr),
    Metric(ComponentAttr, bool),
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Encoder(_) => "encoder",
            Role::Head(_) => "head",
            Role::Loss(_) => "loss",
            Role::Xbm(_) => "xbm",
            Role::Metric(..) => "metric",
        }
    }
}

/// `#[encoder(cache = "...", key = path)]`.
pub struct EncoderAttr {
    /// The cache type (one of [`CACHE_TYPES`], validated later) and its literal.
    pub cache: Option<LitStr>,
    /// A function `fn(&Input) -> impl Hash` giving the cache key.
    pub key: Option<Path>,
    /// With a user record type: a function `fn(&Record) -> &Input`.
    pub input: Option<Path>,
}

/// `#[trainable_model(optimizer = expr, record = Type)]`.
#[derive(Default)]
pub struct ModelOptions {
    /// The model's optimiser (an `OptimizerConfig` expression).
    pub optimizer: Option<Expr>,
    /// The user's own record type, instead of a generated one.
    pub record: Option<syn::Type>,
}

/// Parses the options of `#[trainable_model(...)]`.
pub fn parse_model_options(cx: &Ctxt, args: proc_macro2::TokenStream) -> ModelOptions {
    let mut out = ModelOptions::default();
    if args.is_empty() {
        return out;
    }
    let parser = syn::meta::parser(|meta| {
        if meta.path.is_ident("optimizer") {
            if out.optimizer.is_some() {
                cx.error_spanned_by(&meta.path, "duplicate option `optimizer`");
            }
            out.optimizer = Some(meta.value()?.parse()?);
        } else if meta.path.is_ident("record") {
            if out.record.is_some() {
                cx.error_spanned_by(&meta.path, "duplicate option `record`");
            }
            out.record = Some(meta.value()?.parse()?);
        } else {
            let name = meta.path.to_token_stream_string();
            let hint = did_you_mean(&name, &MODEL_OPTIONS);
            cx.error_spanned_by(
                &meta.path,
                format!(
                    "unknown #[trainable_model] option `{name}`{}; expected `optimizer = OptimizerConfig::...` or `record = YourRecordType`",
                    hint.map(|h| format!(" (did you mean `{h}`?)")).unwrap_or_default()
                ),
            );
            // Read the value as the option it was probably meant to be, so that the
            // misspelling is the only error.
            if meta.input.peek(syn::Token![=]) {
                match hint {
                    Some("record") if out.record.is_none() => {
                        out.record = Some(meta.value()?.parse()?)
                    }
                    Some("optimizer") if out.optimizer.is_none() => {
                        out.optimizer = Some(meta.value()?.parse()?)
                    }
                    _ => {
                        let _: Expr = meta.value()?.parse()?;
                    }
                }
            }
        }
        Ok(())
    });
    if let Err(e) = syn::parse::Parser::parse2(parser, args) {
        cx.syn_error(e);
    }
    out
}

/// `#[head(name = value, ...)]`, `#[loss(...)]` or `#[xbm(...)]`.
pub struct ComponentAttr {
    pub options: Vec<(Ident, Expr)>,
}

/// Parses one of our attributes; `None` when `attr` is not ours.
pub fn parse_role(cx: &Ctxt, attr: &Attribute) -> Option<(Role, Span)> {
    let path = attr.path();
    let kind = ROLES.into_iter().find(|k| path.is_ident(k))?;
    Some(parse_role_as(cx, attr, kind))
}

/// The role `attr` was probably meant to be (`#[haed]`: `head`), for an attribute that is
/// neither ours nor one the language or a common derive knows.
pub fn misspelt_role(attr: &Attribute) -> Option<&'static str> {
    let ident = attr.path().get_ident()?.to_string();
    if KNOWN_ATTRIBUTES.contains(&ident.as_str()) {
        return None;
    }
    did_you_mean(&ident, &ROLES)
}

/// The nearest of `candidates` to `name`, when it is close enough to be a misspelling
/// (at most two edits, case ignored, and fewer edits than letters kept).
pub fn did_you_mean(name: &str, candidates: &[&'static str]) -> Option<&'static str> {
    let lower = name.to_lowercase();
    candidates
        .iter()
        .map(|c| (edit_distance(&lower, c), *c))
        .filter(|&(d, c)| d <= 2 && d < c.len().min(lower.len()))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Parses `attr` as the role `kind` (one of [`ROLES`]), whatever its name.
pub fn parse_role_as(cx: &Ctxt, attr: &Attribute, kind: &str) -> (Role, Span) {
    let span = attr.span();
    let role = match kind {
        "encoder" => Role::Encoder(parse_encoder(cx, attr)),
        "head" => Role::Head(parse_component(cx, attr, false).0),
        "xbm" => Role::Xbm(parse_component(cx, attr, false).0),
        "metric" => {
            let (attr, prog_bar) = parse_component(cx, attr, true);
            Role::Metric(attr, prog_bar)
        }
        _ => Role::Loss(parse_component(cx, attr, false).0),
    };
    (role, span)
}

fn parse_encoder(cx: &Ctxt, attr: &Attribute) -> EncoderAttr {
    let mut out = EncoderAttr {
        cache: None,
        key: None,
        input: None,
    };
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return out;
    }
    let result = attr.parse_nested_meta(|meta| {
        if meta.path.is_ident("cache") {
            let lit: LitStr = meta.value()?.parse()?;
            if out.cache.is_some() {
                cx.error_spanned_by(&meta.path, "duplicate option `cache`");
            }
            out.cache = Some(lit);
        } else if meta.path.is_ident("key") {
            let path: Path = meta.value()?.parse()?;
            if out.key.is_some() {
                cx.error_spanned_by(&meta.path, "duplicate option `key`");
            }
            out.key = Some(path);
        } else if meta.path.is_ident("input") {
            let path: Path = meta.value()?.parse()?;
            if out.input.is_some() {
                cx.error_spanned_by(&meta.path, "duplicate option `input`");
            }
            out.input = Some(path);
        } else {
            let name = meta.path.to_token_stream_string();
            let hint = did_you_mean(&name, &ENCODER_OPTIONS)
                .map(|h| format!(" (did you mean `{h}`?)"))
                .unwrap_or_default();
            cx.error_spanned_by(
                &meta.path,
                format!("unknown encoder option `{name}`{hint}; expected `cache = \"auto\" | \"cpu\" | \"gpu\" | \"none\"`, `key = path::to::fn` or `input = path::to::fn`"),
            );
            // Skip the value so that parsing goes on to the next option.
            if meta.input.peek(syn::Token![=]) {
                let _: Expr = meta.value()?.parse()?;
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        cx.syn_error(e);
    }
    out
}

/// `name = value` options; with `flags`, also the bare flag `prog_bar` (for metrics).
fn parse_component(cx: &Ctxt, attr: &Attribute, flags: bool) -> (ComponentAttr, bool) {
    let mut out = ComponentAttr {
        options: Vec::new(),
    };
    let mut prog_bar = false;
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return (out, prog_bar);
    }
    let result = attr.parse_nested_meta(|meta| {
        let Some(ident) = meta.path.get_ident().cloned() else {
            return Err(meta.error("expected an option name, e.g. `dropout = 0.1`"));
        };
        if flags && !meta.input.peek(syn::Token![=]) {
            if ident != "prog_bar" {
                let hint = did_you_mean(&ident.to_string(), &["prog_bar"])
                    .map(|h| format!(": did you mean `{h}`?"))
                    .unwrap_or_default();
                cx.error_spanned_by(
                    &ident,
                    format!("unknown flag `{ident}`{hint}; a metric takes the flag `prog_bar` and options `name = value`"),
                );
            } else if prog_bar {
                cx.error_spanned_by(&ident, "duplicate flag `prog_bar`");
            }
            prog_bar = true;
            return Ok(());
        }
        let value: Expr = meta.value()?.parse()?;
        if out.options.iter().any(|(n, _)| *n == ident) {
            cx.error_spanned_by(&ident, format!("duplicate option `{ident}`"));
        } else {
            out.options.push((ident, value));
        }
        Ok(())
    });
    if let Err(e) = result {
        cx.syn_error(e);
    }
    (out, prog_bar)
}

trait PathString {
    fn to_token_stream_string(&self) -> String;
}

impl PathString for Path {
    fn to_token_stream_string(&self) -> String {
        quote::ToTokens::to_token_stream(self)
            .to_string()
            .replace(' ', "")
    }
}

/// Levenshtein distance.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_picks_nearest() {
        assert_eq!(edit_distance("gpuu", "gpu"), 1);
        assert_eq!(edit_distance("cpu", "cpu"), 0);
        assert_eq!(edit_distance("", "auto"), 4);
    }

    #[test]
    fn misspellings_and_strangers() {
        assert_eq!(did_you_mean("haed", &ROLES), Some("head"));
        assert_eq!(did_you_mean("Encoder", &ROLES), Some("encoder"));
        assert_eq!(did_you_mean("metrics", &ROLES), Some("metric"));
        assert_eq!(did_you_mean("recrod", &MODEL_OPTIONS), Some("record"));
        assert_eq!(did_you_mean("cahce", &ENCODER_OPTIONS), Some("cache"));
        // Too far from every role, or too short to tell.
        assert_eq!(did_you_mean("serde", &ROLES), None);
        assert_eq!(did_you_mean("test", &ROLES), None);
        assert_eq!(did_you_mean("ab", &ROLES), None);
    }
}
