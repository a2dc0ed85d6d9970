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
            cx.error_spanned_by(
                &meta.path,
                "unknown #[trainable_model] option; expected `optimizer = OptimizerConfig::...` or `record = YourRecordType`",
            );
            if meta.input.peek(syn::Token![=]) {
                let _: Expr = meta.value()?.parse()?;
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
    let kind = ["encoder", "head", "loss", "xbm", "metric"]
        .into_iter()
        .find(|k| path.is_ident(k))?;
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
    Some((role, span))
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
            cx.error_spanned_by(
                &meta.path,
                format!("unknown encoder option `{name}`; expected `cache = \"auto\" | \"cpu\" | \"gpu\" | \"none\"`, `key = path::to::fn` or `input = path::to::fn`"),
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
        if flags && ident == "prog_bar" && !meta.input.peek(syn::Token![=]) {
            if prog_bar {
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
