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
                        } else {
                            if a.path().is_ident("cfg") {
                                cfg = Some(syn::spanned::Spanned::span(a));
                            }
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

    pub fn loss(&self) -> Option<&Field> {
        self.fields
            .iter()
            .find(|f| matches!(f.role(), Some(Role::Loss(_))))
    }
}
