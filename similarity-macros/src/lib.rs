//! The `#[trainable_model]` attribute macro of the similarity framework.
//!
//! The pipeline, one file per phase: [`ast`] parses the struct and its field attributes
//! ([`attr`]) into an owned spec that keeps spans; [`validate`] checks every rule and
//! accumulates all errors; [`expand`] generates the code. The attribute itself is
//! documented where users see it, in `similarity_core`.

mod ast;
mod attr;
mod ctxt;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Turns an annotated struct into a trainable similarity model. See
/// `similarity_core::trainable_model` for the attributes and what is generated.
#[proc_macro_attribute]
pub fn trainable_model(args: TokenStream, input: TokenStream) -> TokenStream {
    expand::trainable_model(args.into(), input.into()).into()
}
