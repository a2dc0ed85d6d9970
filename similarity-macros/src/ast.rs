//! The model spec: the struct as the macro understands it, with spans kept for errors.

use proc_macro2::Span;
use syn::{Attribute, Fields, Ident, ItemStruct, Type, Visibility};

use crate::attr::{self, Role};
use crate::ctxt::Ctxt;

/// The annotated struct.
pub struct Model {
    pub item: ItemStruct,
    pub options: attr::ModelOptions,
    pub fields: Vec<Field>,
}

/// One field, its role and the attributes that stay on it.
pub struct Field {
    pub ident: Ident,
    pub ty: Type,
    pub vis: Visibility,
    /// Attributes that are not ours (doc comments among them), kept on the field.
    pub attrs: Vec<Attribute>,
    /// Our attributes, in order (more than one is an error found by `validate`).
    pub roles: Vec<(Role, Span)>,
    /// The span of a `#[cfg]` on the field, if any.
    pub cfg: Option<Span>,
}

/// Finds our roles inside `#[cfg_attr(predicate, attrs...)]` (nested ones included),
/// reports each, and records it as if written directly; true when there was one (the
/// whole `cfg_attr` is then left out of the output).
fn roles_in_cfg_attr(cx: &Ctxt, attr: &Attribute, roles: &mut Vec<(Role, Span)>) -> bool {
    let Ok(inner) = attr.parse_args_with(|input: syn::parse::ParseStream| {
        let _predicate: syn::Meta = input.parse()?;
        input.parse::<syn::Token![,]>()?;
        syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated(input)
    }) else {
        return false;
    };
    let mut found = false;
    for meta in inner {
        let nested = Attribute {
            pound_token: attr.pound_token,
            style: attr.style,
            bracket_token: attr.bracket_token,
            meta,
        };
        if nested.path().is_ident("cfg_attr") {
            found |= roles_in_cfg_attr(cx, &nested, roles);
        } else if let Some(role) = attr::parse_role(cx, &nested) {
            let name = role.0.name();
            cx.error_spanned_by(
                nested.path(),
                format!(
                    "#[{name}] cannot be inside #[cfg_attr]: the model's wiring must not change \
                     with the build; write #[{name}(...)] on the field directly (a #[cfg] on the \
                     whole struct builds the model only with a feature)"
                ),
            );
            roles.push(role);
            found = true;
        }
    }
    found
}

impl Field {
    pub fn role(&self) -> Option<&Role> {
        self.roles.first().map(|(r, _)| r)
    }
}

impl Model {
    /// Parses the struct; fields that are not named are reported.
    pub fn from_item(cx: &Ctxt, item: ItemStruct, options: attr::ModelOptions) -> Model {
        let mut fields = Vec::new();
        match &item.fields {
            Fields::Named(named) => {
                for f in &named.named {
                    let mut attrs = Vec::new();
                    let mut roles = Vec::new();
                    let mut cfg = None;
                    for a in &f.attrs {
                        if let Some(role) = attr::parse_role(cx, a) {
                            roles.push(role);
                        } else if a.path().is_ident("cfg") {
                            // Reported by `validate` and left out of the output, so that
                            // the field (and the code using it) is in every build.
                            cfg = Some(syn::spanned::Spanned::span(a));
                        } else if a.path().is_ident("cfg_attr")
                            && roles_in_cfg_attr(cx, a, &mut roles)
                        {
                            // Reported; the role is read as if written directly.
                        } else if let Some(kind) = attr::misspelt_role(a) {
                            cx.error_spanned_by(
                                a.path(),
                                format!(
                                    "unknown attribute `#[{}]`: did you mean `#[{kind}]`?",
                                    quote::ToTokens::to_token_stream(a.path())
                                ),
                            );
                            roles.push(attr::parse_role_as(cx, a, kind));
                        } else {
                            attrs.push(a.clone());
                        }
                    }
                    fields.push(Field {
                        ident: f.ident.clone().expect("named field"),
                        ty: f.ty.clone(),
                        vis: f.vis.clone(),
                        attrs,
                        roles,
                        cfg,
                    });
                }
            }
            _ => cx.error_spanned_by(
                &item.ident,
                "#[trainable_model] needs a struct with named fields, one per encoder, head and loss",
            ),
        }
        Model {
            item,
            options,
            fields,
        }
    }

    pub fn encoders(&self) -> impl Iterator<Item = &Field> {
        self.fields
            .iter()
            .filter(|f| matches!(f.role(), Some(Role::Encoder(_))))
    }

    pub fn head(&self) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| matches!(f.role(), Some(Role::Head(_))))
    }

    pub fn metrics(&self) -> impl Iterator<Item = &Field> {
        self.fields
            .iter()
            .filter(|f| matches!(f.role(), Some(Role::Metric(..))))
    }

    pub fn xbm(&self) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| matches!(f.role(), Some(Role::Xbm(_))))
    }

    /// Whether the full expansion can be written: no generics, every field with a role,
    /// at least one encoder, exactly one head and one loss, at most one memory, and the
    /// head and loss types not swapped. With other errors (an unknown option, a
    /// misspelt role read as the role it resembles) the full expansion is still written
    /// next to them, so that code using the model sees no second error.
    pub fn is_complete(&self) -> bool {
        let count = |kind: &str| {
            self.fields
                .iter()
                .filter(|f| f.role().is_some_and(|r| r.name() == kind))
                .count()
        };
        self.item.generics.params.is_empty()
            && self.fields.iter().all(|f| f.role().is_some())
            && count("encoder") >= 1
            && count("head") == 1
            && count("loss") == 1
            && count("xbm") <= 1
            && self.swapped_head_and_loss().is_none()
    }

    /// The head and loss fields when their types look swapped: the head's type is named
    /// like a loss (`...Loss`) and the loss's like a head (`...Head`).
    pub fn swapped_head_and_loss(&self) -> Option<(&Field, &Field)> {
        let last = |ty: &Type| match ty {
            Type::Path(p) => p.path.segments.last().map(|s| s.ident.to_string()),
            _ => None,
        };
        let (head, loss) = (self.head()?, self.loss()?);
        let named = |f: &Field, suffix: &str| last(&f.ty).is_some_and(|n| n.ends_with(suffix));
        (named(head, "Loss") && named(loss, "Head")).then_some((head, loss))
    }

    pub fn loss(&self) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| matches!(f.role(), Some(Role::Loss(_))))
    }
}
