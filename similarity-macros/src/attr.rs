//! Parsing of the field attributes `#[encoder(...)]`, `#[head(...)]`, `#[loss(...)]` and
//! `#[xbm(...)]`.
//!
//! `#[encoder]` takes the options this macro interprets itself (`cache`, `key`);
//! `#[head]`, `#[loss]` and `#[xbm]` take `name = value` pairs that become field assignments on the
//! component's typed `Config`, so the compiler checks names and value types.

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
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Role::Encoder(_) => "encoder",
            Role::Head(_) => "head",
            Role::Loss(_) => "loss",
            Role::Xbm(_) => "xbm",
        }
    }
}

/// `#[encoder(cache = "...", key = path)]`.
pub struct EncoderAttr {
    /// The cache type (one of [`CACHE_TYPES`], validated later) and its literal.
    pub cache: Option<LitStr>,
    /// A function `fn(&Input) -> impl Hash` giving the cache key.
    pub key: Option<Path>,
}

/// `#[head(name = value, ...)]`, `#[loss(...)]` or `#[xbm(...)]`.
pub struct ComponentAttr {
    pub options: Vec<(Ident, Expr)>,
}

/// Parses one of our attributes; `None` when `attr` is not ours.
pub fn parse_role(cx: &Ctxt, attr: &Attribute) -> Option<(Role, Span)> {
    let path = attr.path();
    let kind = ["encoder", "head", "loss", "xbm"]
        .into_iter()
        .find(|k| path.is_ident(k))?;
    let span = attr.span();
    let role = match kind {
        "encoder" => Role::Encoder(parse_encoder(cx, attr)),
        "head" => Role::Head(parse_component(cx, attr)),
        "xbm" => Role::Xbm(parse_component(cx, attr)),
        _ => Role::Loss(parse_component(cx, attr)),
    };
    Some((role, span))
}

fn parse_encoder(cx: &Ctxt, attr: &Attribute) -> EncoderAttr {
    let mut out = EncoderAttr {
        cache: None,
        key: None,
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
        } else {
            let name = meta.path.to_token_stream_string();
            cx.error_spanned_by(
                &meta.path,
                format!("unknown encoder option `{name}`; expected `cache = \"auto\" | \"cpu\" | \"gpu\" | \"none\"` or `key = path::to::fn`"),
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

fn parse_component(cx: &Ctxt, attr: &Attribute) -> ComponentAttr {
    let mut out = ComponentAttr {
        options: Vec::new(),
    };
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return out;
    }
    let result = attr.parse_nested_meta(|meta| {
        let Some(ident) = meta.path.get_ident().cloned() else {
            return Err(meta.error("expected an option name, e.g. `dropout = 0.1`"));
        };
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
    out
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
