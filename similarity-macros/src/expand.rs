//! Code generation. For a model `M` the expansion is:
//! * the struct, with our attributes removed and one hidden field, `__similarity`
//!   (`ModelState`: trainable variables, caches, device);
//! * for several encoders, a record type `MRecord` with one field per encoder, generic
//!   over the encoders' inputs (defaulted to them) so that it derives `Clone`, `Debug`
//!   and `PartialEq` exactly when the inputs have them;
//! * `M::new(encoders..., &ModelOptions)`: builds the head from the summed embedding
//!   sizes and the loss from the head's output size, options as typed config literals;
//! * `impl TrainableModel for M`: embed (cache or encoder → concat → head), cache fill,
//!   save and load (`load` reads the encoders, then checks the manifest's sizes and the
//!   head's options against them and `similarity_core::limits` before building the head;
//!   errors of building the head and the loss from saved options name the manifest);
//! * with an `#[xbm]` field, the memory loss, enqueueing and checkpoint state.
//!
//! **Type checks, one error each.** Every generated item carries the same `where`
//! predicates, one per field, spanned at the field's type: `Text: EncoderField` (or
//! `CachedEncoderField`, `CachedByInputField` for a cached encoder), `Head: Head`, `Loss:
//! SimilarityLoss` (and `MemoryLoss` with `#[xbm]`), `Xbm: XbmField`, metrics
//! `MetricField` (see `similarity-core/src/roles.rs`). A type that does not fit its role
//! fails its predicate once, with the `on_unimplemented` message of the trait it lacks:
//! rustc merges the identical reports of the copies, and the items' bodies assume the
//! predicate, so no use of the type adds an error.
//!
//! **Fallback.** With a validation error the errors are emitted next to the full
//! expansion when the model is still complete ([`Model::is_complete`]: an unknown option
//! is ignored, a misspelt role is read as the role it resembles), and otherwise next to
//! the struct and a `new` that never runs (thiserror's `fallback.rs`, clap's
//! `dummies.rs`), so that code using the model does not fail a second time.

use proc_macro2::{Span, TokenStream, TokenTree};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, ItemStruct};

use crate::ast::{Field, Model};
use crate::attr::{ComponentAttr, Role};
use crate::ctxt::Ctxt;
use crate::validate;

pub fn trainable_model(args: TokenStream, input: TokenStream) -> TokenStream {
    let item: ItemStruct = match syn::parse2(input) {
        Ok(item) => item,
        Err(e) => {
            return syn::Error::new(
                e.span(),
                "#[trainable_model] applies to a struct with named fields",
            )
            .into_compile_error();
        }
    };
    let cx = Ctxt::default();
    let options = crate::attr::parse_model_options(&cx, args);
    let model = Model::from_item(&cx, item, options);
    validate::check(&cx, &model);
    match cx.check() {
        Ok(()) => expand(&model),
        Err(e) => {
            let mut out = if model.is_complete() {
                expand(&model)
            } else {
                fallback(&model)
            };
            out.extend(e.into_compile_error());
            out
        }
    }
}

const P: &str = "::similarity_core::__private";

fn private() -> TokenStream {
    P.parse().expect("valid path")
}

/// The struct without our attributes, plus (with `with_state`) the hidden state field.
fn cleaned_struct(model: &Model, with_state: bool) -> TokenStream {
    let p = private();
    let ItemStruct {
        attrs,
        vis,
        ident,
        generics,
        ..
    } = &model.item;
    let fields = model.fields.iter().map(|f| {
        let Field {
            ident,
            ty,
            vis,
            attrs,
            ..
        } = f;
        quote!(#(#attrs)* #vis #ident: #ty)
    });
    let state = with_state.then(|| {
        quote! {
            /// Runtime state added by `#[trainable_model]`: trainable variables, caches, device.
            #[doc(hidden)]
            __similarity: #p::ModelState,
        }
    });
    quote! {
        #(#attrs)*
        #vis struct #ident #generics {
            #(#fields,)*
            #state
        }
    }
}

/// Whether an encoder field is cached (`cache` other than `"none"`).
fn cached(f: &Field) -> bool {
    matches!(f.role(), Some(Role::Encoder(e)) if e.cache.as_ref().is_some_and(|c| c.value() != "none"))
}

/// `#ty: #bound`, the bound spanned at the type's last token, so that an unsatisfied
/// predicate underlines the whole type.
fn predicate(ty: &syn::Type, bound: &str) -> TokenStream {
    let span = ty.to_token_stream().into_iter().last().map_or_else(
        || ty.span(),
        |t| match t {
            TokenTree::Group(g) => g.span_close(),
            t => t.span(),
        },
    );
    let bound: TokenStream = format!("{P}::{bound}").parse().expect("valid path");
    let bound = respan(bound, span);
    quote!(#ty: #bound)
}

/// `tokens` with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut t| {
            if let TokenTree::Group(g) = &t {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                t = TokenTree::Group(group);
            }
            t.set_span(span);
            t
        })
        .collect()
}

/// The `where` predicates of every generated item: what each field's role asks of its
/// type (see the module docs), for the fields whose role is one of `roles`. Predicates
/// that are written the same are kept once.
fn predicates(model: &Model, roles: &[&str]) -> Vec<TokenStream> {
    let mut out: Vec<TokenStream> = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut push = |ty: &syn::Type, bound: &str| {
        let key = format!("{}: {bound}", ty.to_token_stream());
        if !seen.contains(&key) {
            seen.push(key);
            out.push(predicate(ty, bound));
        }
    };
    let record = model.options.record.is_none();
    for f in &model.fields {
        if !f.role().is_some_and(|r| roles.contains(&r.name())) {
            continue;
        }
        match f.role() {
            Some(Role::Encoder(e)) if cached(f) && e.key.is_some() => {
                push(&f.ty, "CachedEncoderField")
            }
            Some(Role::Encoder(_)) if cached(f) => push(&f.ty, "CachedByInputField"),
            Some(Role::Encoder(_)) if record => push(&f.ty, "EncoderField"),
            Some(Role::Encoder(_)) => push(&f.ty, "Encoder"),
            Some(Role::Head(_)) => push(&f.ty, "Head"),
            Some(Role::Loss(_)) => {
                push(&f.ty, "SimilarityLoss");
                if model.xbm().is_some() {
                    push(&f.ty, "MemoryLoss");
                }
            }
            Some(Role::Xbm(_)) => push(&f.ty, "XbmField"),
            Some(Role::Metric(..)) => push(&f.ty, "MetricField"),
            None => {}
        }
    }
    out
}

/// The record type and, for several encoders without `record = ...`, its definition:
/// `MRecord<TextInput = <Text as Encoder>::Input, ...>`, generic so that its derives
/// hold exactly when the inputs allow them.
fn record(model: &Model, predicates: &[TokenStream]) -> (TokenStream, Option<TokenStream>) {
    let p = private();
    let name = &model.item.ident;
    let vis = &model.item.vis;
    let encoders: Vec<&Field> = model.encoders().collect();
    if let Some(ty) = &model.options.record {
        return (quote!(#ty), None);
    }
    match encoders.as_slice() {
        // Only in a fallback: a model without an encoder has no record.
        [] => return (quote!(()), None),
        [only] => {
            let ty = &only.ty;
            return (quote!(<#ty as #p::Encoder>::Input), None);
        }
        _ => {}
    }
    let record_ident = format_ident!("{}Record", name);
    // Type parameters named after the fields, kept apart from every name in the types.
    let taken: Vec<String> = model
        .fields
        .iter()
        .flat_map(|f| idents(f.ty.to_token_stream()))
        .collect();
    let params: Vec<Ident> = encoders
        .iter()
        .map(|f| {
            let mut name = format!("{}Input", camel(&f.ident.to_string()));
            while taken.contains(&name) {
                name.insert(0, '_');
            }
            Ident::new(&name, f.ident.span())
        })
        .collect();
    let defaults = encoders.iter().zip(&params).map(|(f, param)| {
        let ty = &f.ty;
        quote!(#param = <#ty as #p::Encoder>::Input)
    });
    let fields = encoders.iter().zip(&params).map(|(f, param)| {
        let ident = &f.ident;
        let doc = format!("Input of encoder `{ident}`.");
        quote!(#[doc = #doc] pub #ident: #param)
    });
    let doc = format!(
        "One object for [`{name}`]: the input of each of its encoders, in the order their \
         embeddings are concatenated. `Clone`, `Debug` and `PartialEq` when the inputs are."
    );
    let idents: Vec<&Ident> = encoders.iter().map(|f| &f.ident).collect();
    let names: Vec<String> = idents.iter().map(|i| i.to_string()).collect();
    let record_name = record_ident.to_string();
    // The derives written out: a derive's reports of a false predicate would carry its own
    // note and so not merge with those of the other items.
    let def = quote! {
        #[doc = #doc]
        #vis struct #record_ident<#(#defaults),*>
        where
            #(#predicates,)*
        {
            #(#fields,)*
        }

        #[automatically_derived]
        impl<#(#params: ::core::clone::Clone),*> ::core::clone::Clone for #record_ident<#(#params),*>
        where
            #(#predicates,)*
        {
            fn clone(&self) -> Self {
                Self { #(#idents: ::core::clone::Clone::clone(&self.#idents),)* }
            }
        }

        #[automatically_derived]
        impl<#(#params: ::core::fmt::Debug),*> ::core::fmt::Debug for #record_ident<#(#params),*>
        where
            #(#predicates,)*
        {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.debug_struct(#record_name)
                    #(.field(#names, &self.#idents))*
                    .finish()
            }
        }

        #[automatically_derived]
        impl<#(#params: ::core::cmp::PartialEq),*> ::core::cmp::PartialEq for #record_ident<#(#params),*>
        where
            #(#predicates,)*
        {
            fn eq(&self, other: &Self) -> bool {
                #(self.#idents == other.#idents)&&*
            }
        }
    };
    (quote!(#record_ident), Some(def))
}

fn idents(tokens: TokenStream) -> Vec<String> {
    tokens
        .into_iter()
        .flat_map(|t| match t {
            TokenTree::Ident(i) => vec![i.to_string()],
            TokenTree::Group(g) => idents(g.stream()),
            _ => Vec::new(),
        })
        .collect()
}

/// `product_title` → `ProductTitle`.
fn camel(snake: &str) -> String {
    snake
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().chain(c).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

/// What is emitted next to the errors of a model that cannot be expanded: the struct,
/// the record of its encoders and a `new` that never runs, so that code calling
/// `Model::new` or naming the record does not fail too.
fn fallback(model: &Model) -> TokenStream {
    let mut out = cleaned_struct(model, false);
    if !model.item.generics.params.is_empty() {
        return out;
    }
    let p = private();
    let name = &model.item.ident;
    let vis = &model.item.vis;
    let loss = model.loss().filter(|_| {
        let losses = model
            .fields
            .iter()
            .filter(|f| matches!(f.role(), Some(Role::Loss(_))));
        losses.count() == 1 && model.swapped_head_and_loss().is_none()
    });
    let has_record = model.options.record.is_some() || model.encoders().next().is_some();
    let stub_impl = loss.is_some() && has_record;
    let roles: &[&str] = if stub_impl {
        &["encoder", "loss"]
    } else {
        &["encoder"]
    };
    let (record_ty, record_def) = record(model, &predicates(model, &["encoder"]));
    let predicates = predicates(model, roles);
    let enc_idents: Vec<&Ident> = model.encoders().map(|f| &f.ident).collect();
    let enc_tys: Vec<&syn::Type> = model.encoders().map(|f| &f.ty).collect();
    out.extend(quote! {
        #record_def

        #[automatically_derived]
        impl #name {
            /// Not built: the model has errors.
            #vis fn new(
                #(#enc_idents: #enc_tys,)*
                options: &#p::ModelOptions,
            ) -> #p::Result<Self> {
                let _ = (#(#enc_idents,)* options);
                ::core::unreachable!("the model has compile errors")
            }
        }
    });
    if let Some(loss) = loss.filter(|_| stub_impl) {
        let loss_ty = &loss.ty;
        let name_str = name.to_string();
        out.extend(quote! {
            #[automatically_derived]
            impl #p::TrainableModel for #name
            where
                #(#predicates,)*
            {
                type Record = #record_ty;
                type Loss = #loss_ty;
                const NAME: &'static str = #name_str;

                fn state(&self) -> &#p::ModelState {
                    ::core::unreachable!("the model has compile errors")
                }

                fn loss(&self) -> &Self::Loss {
                    ::core::unreachable!("the model has compile errors")
                }

                fn embed(
                    &self,
                    _: &#p::EncoderBatch<'_, Self::Record>,
                    _: &mut #p::Mode<'_>,
                ) -> #p::Result<#p::Tensor> {
                    ::core::unreachable!("the model has compile errors")
                }

                fn fill_caches(
                    &mut self,
                    _: &[&Self::Record],
                    _: usize,
                    _: &mut dyn #p::FnMut(&'static str, usize, usize),
                ) -> #p::Result<#p::CachedRows> {
                    ::core::unreachable!("the model has compile errors")
                }

                fn save(&self, _: &#p::Path) -> #p::Result<()> {
                    ::core::unreachable!("the model has compile errors")
                }

                fn load(_: &#p::Path, _: &#p::Device) -> #p::Result<Self> {
                    ::core::unreachable!("the model has compile errors")
                }
            }
        });
    }
    out
}

fn expand(model: &Model) -> TokenStream {
    let p = private();
    let name = &model.item.ident;
    let vis = &model.item.vis;
    let name_str = name.to_string();
    let head = model.head().expect("complete");
    let loss = model.loss().expect("complete");
    let (head_ident, head_ty) = (&head.ident, &head.ty);
    let (loss_ident, loss_ty) = (&loss.ident, &loss.ty);
    let encoders: Vec<&Field> = model.encoders().collect();
    let enc_idents: Vec<&Ident> = encoders.iter().map(|f| &f.ident).collect();
    let enc_tys: Vec<&syn::Type> = encoders.iter().map(|f| &f.ty).collect();
    let enc_names: Vec<String> = enc_idents.iter().map(|i| i.to_string()).collect();
    let n_encoders = encoders.len();
    let single = n_encoders == 1;
    let encoder_predicates = predicates(model, &["encoder"]);
    let predicates = predicates(model, &crate::attr::ROLES);

    let user_record = model.options.record.as_ref();
    let (record_ty, record_def) = record(model, &encoder_predicates);
    // How each encoder's input is read from a record, as a closure and as an expression
    // of `r`.
    let inputs: Vec<TokenStream> = encoders
        .iter()
        .map(|f| {
            let ident = &f.ident;
            match f.role() {
                Some(Role::Encoder(e)) if e.input.is_some() && user_record.is_some() => {
                    let path = e.input.as_ref().expect("checked");
                    quote_spanned!(path.span()=> #path(r))
                }
                _ if single && user_record.is_none() => quote!(r),
                _ => quote!(&r.#ident),
            }
        })
        .collect();
    let accessors: Vec<TokenStream> = inputs
        .iter()
        .map(|input| quote!(|r: &Self::Record| #input))
        .collect();

    let cache_types: Vec<TokenStream> = encoders
        .iter()
        .map(|f| {
            let Some(Role::Encoder(e)) = f.role() else {
                unreachable!()
            };
            let v = match e.cache.as_ref().map(syn::LitStr::value).as_deref() {
                Some("auto") => quote!(Auto),
                Some("cpu") => quote!(Cpu),
                Some("gpu") => quote!(Gpu),
                _ => quote!(None),
            };
            quote!(#p::CacheType::#v)
        })
        .collect();
    // Only cached encoders are filled; their inputs are hashable (or have a key).
    let fills: Vec<TokenStream> = encoders
        .iter()
        .zip(accessors.iter().zip(&inputs))
        .enumerate()
        .filter_map(|(slot, (f, (access, input)))| {
            let Some(Role::Encoder(e)) = f.role() else { unreachable!() };
            if !cached(f) {
                return None;
            }
            let ident = &f.ident;
            let key = match &e.key {
                Some(path) => quote_spanned!(path.span()=> |r: &Self::Record| #p::cache_key(&#path(#input))),
                None => quote!(|r: &Self::Record| #p::HashKey::hash_key(#input)),
            };
            Some(quote! {
                self.__similarity.fill_encoder(#slot, &self.#ident, records, #access, #key, batch_size, progress, &mut rows)?;
            })
        })
        .collect();

    // Without a cached encoder there is nothing to fill.
    let unused = fills
        .is_empty()
        .then(|| quote!(let _ = (records, batch_size, progress);));
    let xbm = model.xbm();
    let xbm_build = xbm.map(|f| {
        let (ident, ty) = (&f.ident, &f.ty);
        let config = config_literal(f, quote!(#p::XbmConfig));
        quote!(let #ident = <#ty as #p::XbmField>::build(#config, &options.device)?;)
    });
    let xbm_ident = xbm.map(|f| &f.ident);
    let xbm_field = xbm_ident.map(|i| quote!(#i,));
    let xbm_methods = xbm_ident.map(|x| {
        let targets = quote!(<<Self::Loss as #p::SimilarityLoss>::Kind as #p::LossKind>::Targets);
        quote! {
            fn memory_loss(
                &self,
                embeddings: &#p::Tensor,
                targets: &#targets,
                step: usize,
            ) -> #p::Result<::core::option::Option<#p::Tensor>> {
                #p::memory_loss::<#loss_ty>(
                    #p::XbmField::xbm(&self.#x),
                    &self.#loss_ident,
                    embeddings,
                    targets,
                    step,
                )
            }

            fn memory_enqueue(&mut self, embeddings: &#p::Tensor, targets: &#targets) -> #p::Result<()> {
                #p::memory_enqueue::<#loss_ty>(#p::XbmField::xbm_mut(&mut self.#x), embeddings, targets)
            }

            fn extra_state(&self) -> #p::HashMap<::std::string::String, #p::Tensor> {
                #p::XbmField::xbm(&self.#x).state_tensors()
            }

            fn load_extra_state(&mut self, state: &#p::HashMap<::std::string::String, #p::Tensor>) -> #p::Result<()> {
                let dim = #p::Head::output_size(&self.#head_ident);
                #p::XbmField::xbm_mut(&mut self.#x).load_state(state, dim)
            }
        }
    });
    let metric_fields: Vec<&Field> = model.metrics().collect();
    let metric_builds = metric_fields.iter().map(|f| {
        let (ident, ty) = (&f.ident, &f.ty);
        let value = config_literal(f, quote!(#ty));
        quote!(let #ident: #ty = #value;)
    });
    let metric_idents: Vec<&Ident> = metric_fields.iter().map(|f| &f.ident).collect();
    let metric_list = metric_fields.iter().map(|f| {
        let ident = &f.ident;
        let prog_bar = matches!(f.role(), Some(Role::Metric(_, true)));
        quote!((&self.#ident as &dyn #p::Metric, #prog_bar))
    });
    let metrics_method = (!metric_fields.is_empty()).then(|| {
        quote! {
            fn metrics(&self) -> ::std::vec::Vec<(&dyn #p::Metric, bool)> {
                ::std::vec![#(#metric_list),*]
            }
        }
    });
    let optimizer_method = model.options.optimizer.as_ref().map(|expr| {
        quote! {
            fn optimizer() -> ::core::option::Option<#p::OptimizerConfig> {
                ::core::option::Option::Some(#expr)
            }
        }
    });
    let head_config = config_literal(head, quote!(<#head_ty as #p::Head>::Config));
    let loss_config = config_literal(loss, quote!(<#loss_ty as #p::SimilarityLoss>::Config));
    let slots: Vec<usize> = (0..n_encoders).collect();
    let input_size = quote!(0usize #(+ #p::Encoder::embedding_size(&#enc_idents))*);
    let concat = if single {
        let e = enc_idents[0];
        quote!(#e)
    } else {
        quote!(#p::Tensor::cat(&[#(&#enc_idents),*], 1)?)
    };
    let new_doc = format!(
        "Builds a `{name}` from its encoders: the head is sized from their summed \
         embedding sizes, the loss from the head's output, both initialised from \
         `options.seed` on `options.device`."
    );
    let struct_def = cleaned_struct(model, true);

    quote! {
        #struct_def

        #record_def

        #[automatically_derived]
        #[allow(clippy::field_reassign_with_default)]
        impl #name {
            #[doc = #new_doc]
            #vis fn new(
                #(#enc_idents: #enc_tys,)*
                options: &#p::ModelOptions,
            ) -> #p::Result<Self>
            where
                #(#predicates,)*
            {
                Self::__build(#(#enc_idents,)* #head_config, #loss_config, options, &|e| e)
            }

            /// `config_error` maps the errors of building the head and the loss from
            /// their options (`load` names the file they were read from).
            fn __build(
                #(#enc_idents: #enc_tys,)*
                head_config: <#head_ty as #p::Head>::Config,
                loss_config: <#loss_ty as #p::SimilarityLoss>::Config,
                options: &#p::ModelOptions,
                config_error: &dyn ::core::ops::Fn(#p::Error) -> #p::Error,
            ) -> #p::Result<Self>
            where
                #(#predicates,)*
            {
                let mut params = #p::Params::new(&options.device, options.seed);
                // The head's input is the concatenation of the encoders, in field order.
                let input_size = #input_size;
                let #head_ident = <#head_ty as #p::Head>::new(input_size, head_config, &mut params.scope("head"))
                    .map_err(config_error)?;
                let #loss_ident = <#loss_ty as #p::SimilarityLoss>::new(
                    #p::Head::output_size(&#head_ident),
                    loss_config,
                    &mut params.scope("loss"),
                )
                .map_err(config_error)?;
                #xbm_build
                #(#metric_builds)*
                let mut state = #p::ModelState::new(params);
                #(state.add_encoder(#enc_names, &#enc_idents, #cache_types)?;)*
                ::core::result::Result::Ok(Self {
                    #(#enc_idents,)*
                    #head_ident,
                    #loss_ident,
                    #xbm_field
                    #(#metric_idents,)*
                    __similarity: state,
                })
            }
        }

        #[automatically_derived]
        impl #p::TrainableModel for #name
        where
            #(#predicates,)*
        {
            type Record = #record_ty;
            type Loss = #loss_ty;
            const NAME: &'static str = #name_str;

            fn state(&self) -> &#p::ModelState {
                &self.__similarity
            }

            fn loss(&self) -> &Self::Loss {
                &self.#loss_ident
            }

            fn embed(
                &self,
                batch: &#p::EncoderBatch<'_, Self::Record>,
                mode: &mut #p::Mode<'_>,
            ) -> #p::Result<#p::Tensor> {
                #(let #enc_idents = self.__similarity.embed_encoder(#slots, &self.#enc_idents, batch, #accessors, mode)?;)*
                <#head_ty as #p::Head>::forward(&self.#head_ident, &#concat, mode)
            }

            fn record_cost(&self, r: &Self::Record) -> ::core::option::Option<usize> {
                let costs = [#(#p::Encoder::cost_hint(&self.#enc_idents, #inputs)),*];
                costs
                    .iter()
                    .any(::core::option::Option::is_some)
                    .then(|| costs.iter().flatten().sum())
            }

            fn fill_caches(
                &mut self,
                records: &[&Self::Record],
                batch_size: usize,
                progress: &mut dyn #p::FnMut(&'static str, usize, usize),
            ) -> #p::Result<#p::CachedRows> {
                let mut rows = #p::CachedRows::new(#n_encoders);
                #unused
                #(#fills)*
                ::core::result::Result::Ok(rows)
            }

            fn save(&self, dir: &#p::Path) -> #p::Result<()> {
                let mut writer = #p::ServableWriter::create(dir)?;
                #(writer.encoder(#enc_names, &self.#enc_idents)?;)*
                writer.finish(Self::NAME, &self.#head_ident, &self.#loss_ident, &self.__similarity)
            }

            fn load(dir: &#p::Path, device: &#p::Device) -> #p::Result<Self> {
                // Read again if a writer swaps the directory meanwhile: one version only.
                #p::read_dir_consistently(dir, |dir| {
                    let reader = #p::ServableReader::open(dir, Self::NAME)?;
                    #(let #enc_idents = reader.encoder::<#enc_tys>(#enc_names, device)?;)*
                    // Every size is checked against the manifest and the bounds before the
                    // head is built from it.
                    let input_size = #input_size;
                    let head_config = reader.head_config::<#head_ty>(input_size)?;
                    let loss_config = reader.loss_config::<#loss_ty>()?;
                    let options = #p::ModelOptions { device: device.clone(), seed: 0 };
                    let model = Self::__build(
                        #(#enc_idents,)*
                        head_config,
                        loss_config,
                        &options,
                        &|e| reader.in_manifest(e),
                    )?;
                    reader.finish(
                        &model.__similarity,
                        #p::Head::input_size(&model.#head_ident),
                        #p::Head::output_size(&model.#head_ident),
                    )?;
                    ::core::result::Result::Ok(model)
                })
            }

            #xbm_methods
            #metrics_method
            #optimizer_method
        }
    }
}

/// `{ let mut config: Config = Default::default(); config.name = value; ...; config }`,
/// each assignment spanned on the user's option so a misspelt name or a wrong value type
/// is reported there.
fn config_literal(field: &Field, config_ty: TokenStream) -> TokenStream {
    let p = private();
    let options = match field.role() {
        Some(Role::Head(ComponentAttr { options }))
        | Some(Role::Loss(ComponentAttr { options }))
        | Some(Role::Xbm(ComponentAttr { options }))
        | Some(Role::Metric(ComponentAttr { options }, _)) => &options[..],
        _ => &[],
    };
    if options.is_empty() {
        return quote!(<#config_ty as #p::Default>::default());
    }
    let config = Ident::new("config", Span::mixed_site());
    let sets = options
        .iter()
        .map(|(name, value)| quote_spanned!(name.span()=> #config.#name = #value;));
    quote! {{
        let mut #config: #config_ty = #p::Default::default();
        #(#sets)*
        #config
    }}
}

#[cfg(test)]
mod tests {
    //! Expansion snapshots: each `tests/expand/<name>.rs` of the workspace is expanded and
    //! pretty-printed; the result is compared with `tests/expand/snapshots/`. Review a
    //! change with `cargo insta review` (or `INSTA_UPDATE=always cargo test`).

    use std::path::Path;

    fn expand_file(name: &str) -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/expand");
        let source = std::fs::read_to_string(root.join(format!("{name}.rs"))).unwrap();
        let file: syn::File = syn::parse_file(&source).unwrap();
        let mut out = proc_macro2::TokenStream::new();
        for item in file.items {
            let syn::Item::Struct(mut s) = item else {
                continue;
            };
            let at = s
                .attrs
                .iter()
                .position(|a| a.path().is_ident("trainable_model"))
                .unwrap();
            let args = match &s.attrs.remove(at).meta {
                syn::Meta::List(list) => list.tokens.clone(),
                _ => proc_macro2::TokenStream::new(),
            };
            out.extend(super::trainable_model(
                args,
                quote::ToTokens::to_token_stream(&s),
            ));
        }
        prettyplease::unparse(&syn::parse2(out).expect("the expansion is valid Rust"))
    }

    fn check(name: &str) {
        let mut settings = insta::Settings::clone_current();
        settings.set_snapshot_path("../../tests/expand/snapshots");
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(|| insta::assert_snapshot!(name, expand_file(name)));
    }

    #[test]
    fn faq_model() {
        check("faq_model");
    }

    #[test]
    fn mixed_model() {
        check("mixed_model");
    }

    #[test]
    fn group_xbm_model() {
        check("group_xbm_model");
    }

    #[test]
    fn custom_record() {
        check("custom_record");
    }
}
