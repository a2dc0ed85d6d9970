//! The rules a model struct must follow, one check per rule; every violation is
//! recorded with a span and a message that says how to fix it.

use quote::ToTokens;

use crate::ast::Model;
use crate::attr::{CACHE_TYPES, Role, edit_distance};
use crate::ctxt::Ctxt;

pub fn check(cx: &Ctxt, model: &Model) {
    check_generics(cx, model);
    check_roles(cx, model);
    check_counts(cx, model);
    check_swapped(cx, model);
    check_xbm(cx, model);
    check_sizes(cx, model);
    check_record(cx, model);
    check_cache_types(cx, model);
    check_cfg(cx, model);
}

fn check_generics(cx: &Ctxt, model: &Model) {
    let g = &model.item.generics;
    if !g.params.is_empty() {
        cx.error_spanned_by(
            &g.params,
            "#[trainable_model] does not support generic parameters or lifetimes; \
             name the concrete encoder, head and loss types in the fields",
        );
    }
}

fn check_roles(cx: &Ctxt, model: &Model) {
    for f in &model.fields {
        if f.roles.is_empty() {
            cx.error_spanned_by(
                &f.ident,
                format!(
                    "field `{}` has no role: annotate it with #[encoder], #[head], #[loss], #[xbm] or #[metric]",
                    f.ident
                ),
            );
        }
        let first = f.roles.first().map(|(r, _)| r.name());
        for (role, span) in f.roles.iter().skip(1) {
            let msg = if Some(role.name()) == first {
                format!(
                    "duplicate #[{}] attribute on field `{}`",
                    role.name(),
                    f.ident
                )
            } else {
                format!(
                    "field `{}` already has the #[{}] role; a field has exactly one role",
                    f.ident,
                    first.unwrap_or_default()
                )
            };
            cx.syn_error(syn::Error::new(*span, msg));
        }
    }
}

fn check_counts(cx: &Ctxt, model: &Model) {
    let ident = &model.item.ident;
    if model.encoders().next().is_none() {
        cx.error_spanned_by(
            ident,
            "a trainable model needs at least one encoder: add a field such as \
             `#[encoder(cache = \"auto\")] text: HashedNgramEncoder`",
        );
    }
    for (kind, example) in [
        ("head", "`#[head] head: SkipConnectionHead`"),
        ("loss", "`#[loss] loss: MultipleNegativesRankingLoss`"),
    ] {
        let fields: Vec<_> = model
            .fields
            .iter()
            .filter(|f| f.role().is_some_and(|r| r.name() == kind))
            .collect();
        match fields.as_slice() {
            [] => cx.error_spanned_by(
                ident,
                format!("a trainable model needs exactly one #[{kind}] field, e.g. {example}"),
            ),
            [first, rest @ ..] => {
                for f in rest {
                    cx.error_spanned_by(
                        &f.ident,
                        format!(
                            "a model has exactly one #[{kind}]; `{}` is already the {kind}",
                            first.ident
                        ),
                    );
                }
            }
        }
    }
}

/// One error for a head and a loss written in each other's place (each type alone
/// would give its own error at the type level).
fn check_swapped(cx: &Ctxt, model: &Model) {
    if let Some((head, loss)) = model.swapped_head_and_loss() {
        let (h, l) = (head.ty.to_token_stream(), loss.ty.to_token_stream());
        cx.error_spanned_by(
            &head.ty,
            format!(
                "the #[head] and #[loss] types are swapped: `{h}` is a loss and `{l}` a head; \
                 write `#[head] {}: {l}` and `#[loss] {}: {h}`",
                head.ident, loss.ident
            ),
        );
    }
}

fn check_xbm(cx: &Ctxt, model: &Model) {
    let fields: Vec<_> = model
        .fields
        .iter()
        .filter(|f| f.role().is_some_and(|r| r.name() == "xbm"))
        .collect();
    if let [first, rest @ ..] = fields.as_slice() {
        for f in rest {
            cx.error_spanned_by(
                &f.ident,
                format!(
                    "a model has at most one #[xbm] memory; `{}` is already it",
                    first.ident
                ),
            );
        }
    }
}

/// Options whose literal value must be at least 1.
fn check_sizes(cx: &Ctxt, model: &Model) {
    for f in &model.fields {
        let options = match f.role() {
            Some(Role::Xbm(c)) => &c.options,
            Some(Role::Metric(c, _)) => &c.options,
            _ => continue,
        };
        for (name, value) in options {
            let positive = ["size", "k"].contains(&name.to_string().as_str());
            if let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Int(i),
                ..
            }) = value
                && positive
                && i.base10_parse::<u64>().is_ok_and(|v| v == 0)
            {
                cx.error_spanned_by(
                    value,
                    format!(
                        "`{name}` must be at least 1: a {} of 0 cannot hold anything",
                        if name == "size" { "memory" } else { "cut-off" }
                    ),
                );
            }
        }
    }
}

/// `input = ...` on encoders belongs with a user record type, and only there.
fn check_record(cx: &Ctxt, model: &Model) {
    for f in model.encoders() {
        let Some(Role::Encoder(e)) = f.role() else {
            continue;
        };
        if let (Some(input), None) = (&e.input, &model.options.record) {
            cx.error_spanned_by(
                input,
                "`input` reads an encoder's input from your own record type; declare that type \
                 with #[trainable_model(record = YourRecord)], or remove `input`",
            );
        }
    }
}

fn check_cache_types(cx: &Ctxt, model: &Model) {
    for f in model.encoders() {
        let Some(Role::Encoder(e)) = f.role() else {
            continue;
        };
        let Some(lit) = &e.cache else { continue };
        let value = lit.value();
        if !CACHE_TYPES.contains(&value.as_str()) {
            let nearest = CACHE_TYPES
                .iter()
                .min_by_key(|c| edit_distance(&value.to_lowercase(), c))
                .expect("non-empty");
            cx.error_spanned_by(
                lit.to_token_stream(),
                format!(
                    "unknown cache type \"{value}\": did you mean \"{nearest}\"? \
                     Expected one of \"auto\", \"cpu\", \"gpu\", \"none\""
                ),
            );
        }
    }
}

fn check_cfg(cx: &Ctxt, model: &Model) {
    for f in &model.fields {
        if let Some(span) = f.cfg {
            cx.syn_error(syn::Error::new(
                span,
                "#[cfg] is not supported on fields of a #[trainable_model]: the model's \
                 wiring must not change with the build; put the cfg on the whole struct",
            ));
        }
    }
}
