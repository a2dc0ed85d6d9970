//! Benchmark of the workloads W1 to W4 (the same work that
//! Quaterion's `bench.py` measured), printing one JSON line per measurement.
//!
//! ```text
//! cargo run --release --example bench -- --all            # matmul, W1 to W4, 3 runs each
//! cargo run --release --example bench -- --w1 --runs 5    # matmul and W1 only
//! cargo run --release --example bench -- --only w1_cached --gflops 60   # one run, this process
//! ```
//!
//! Flags: `--w1 --w2 --w3 --w4 --all`, `--w1-cached` (W1 cached only), `--evaluator`
//! (the `Evaluator` alone on `--items` embeddings; `--eval-queries Q` ranks a seeded
//! sample of `Q` queries against all of them), `--runs N` (runs of each workload,
//! default 3), `--epochs N` (default 10), and the sizes (defaults: Quaterion's bench.py):
//! `--items N` (20000), `--val-items N` (2000), `--classes N` (100), `--batch N` (256),
//! `--dim N` (embedding size, 384), `--xbm-size N` (W3's memory: 1024, 4096, 16384 or
//! 65536; default 4096), `--w4-batch N` (1024). Every raw line records the sizes.
//!
//! One module per workload: `groups` (W1, W3), `w2`, `w4`, `faq`; `common` holds the data,
//! the encoder, the probes and the floors.
//!
//! The FAQ task end to end (feature `transformers`): Quaterion's NLP tutorial recipe on
//! `data/cloud-faq` with all-MiniLM-L6-v2 frozen and cached, 500 epochs by default:
//!
//! ```text
//! bash scripts/fetch-minilm.sh
//! cargo run --release --features transformers --example bench -- \
//!     --faq target/models/all-MiniLM-L6-v2 [--epochs 500] [--scale 20|10] [--seed N]
//! ```
//!
//! `--scale 10` trains MNRL at the sharpness of Quaterion's (its scale 20 acts on the
//! similarity `(1 + cos) / 2`, i.e. `10 · cos`); `--seed` seeds the head and the batch order.
//!
//! It prints the matmul line and one `faq` line: `evaluate_before_s` (the first full-set
//! evaluation, which fills the validation cache), `cache_fill_s` (the training texts),
//! `mean_epoch_s` (training and validation, after the first epoch), `fit_wall_s`,
//! `total_s` (model built to final evaluation), `peak_rss_mb`, precision@1 and MRR
//! before and after over the full validation set, the fill's matmul floor, and the end to
//! end floor (`end_to_end_floor_s`: every text's encoder FLOPs plus each epoch's head and
//! loss FLOPs, training and validation, at the 2048³ rate of the same run) with
//! `end_to_end_ratio = total_s / end_to_end_floor_s`.
//! `scripts/quaterion_faq.py` runs the same recipe with Quaterion.
//!
//! * First line: the f32 matmul throughput of this machine, 2048³, median of 5.
//! * W1 to W3: every run is a fresh process (the example runs itself with `--only NAME`)
//!   so that its peak RSS (`VmHWM`) is its own. A run prints its figures; after the runs of
//!   a workload, a `summary` line gives the medians, the floor of each timing (its matmul
//!   FLOPs divided by the measured throughput) and `ratio = time / floor`.
//!   Training runs without validation, so epoch times are training only; one validation
//!   pass over the held-out set is timed separately.
//! * W4: forward + backward of every loss on 1024 × 384 N(0, 1) embeddings.
//!
//! Every line has `machine_load`: CPU seconds used by other processes during the
//! measurement (from `/proc/stat` minus this process's own time), as a fraction of
//! the machine's capacity over the wall time.

mod common;
mod evaluator;
mod faq;
#[path = "../common/faq_task.rs"]
#[allow(dead_code)]
mod faq_task;
mod groups;
mod w2;
mod w4;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use similarity_core::prelude::*;

use common::*;

/// One workload in this process.
fn run_workload(name: &str, epochs: usize) -> Result<Value> {
    let load = Load::start();
    if name == "faq" {
        let mut out = faq::faq(epochs)?;
        out["peak_rss_mb"] = json!(round(vm_hwm_mb(), 1));
        out["epochs"] = json!(epochs);
        out["candle_num_threads_env"] = candle_threads_env();
        out["malloc_env"] = malloc_env();
        out["machine_load"] = load.finish();
        return Ok(out);
    }
    let mut out = if name == "evaluator" {
        evaluator::evaluator()?
    } else {
        // The data matrix moves into the tensor (no copy: the peak RSS counts it once).
        let Data { x, classes } = make_data();
        let matrix = Arc::new(Tensor::from_vec(
            x,
            (sizes().items + sizes().val_items, DIM_IN),
            &bench_device()?,
        )?);
        match name {
            "w1_cached" | "w1_uncached" | "w3" => groups::run(name, matrix, &classes, epochs)?,
            "w2" => w2::w2(matrix, &classes, epochs)?,
            other => bail!("unknown workload {other}"),
        }
    };
    out["sizes"] = sizes().json();
    out["peak_rss_mb"] = json!(round(vm_hwm_mb(), 1));
    out["epochs"] = json!(epochs);
    out["candle_num_threads_env"] = candle_threads_env();
    out["malloc_env"] = malloc_env();
    out["machine_load"] = load.finish();
    Ok(out)
}

/// The summary of the evaluator's runs: median time and peak RSS, the floor (the distance
/// matrix's FLOPs at `gflops`) and the ratio.
fn evaluator_summary(runs: &[Value], gflops: f64) -> Result<Value> {
    let med = |key: &str| median(runs.iter().filter_map(|r| r[key].as_f64()).collect());
    let flops = evaluator::evaluator_flops()?;
    let floor = flops / (gflops * 1e9);
    let time = med("evaluate_s");
    Ok(json!({
        "measurement": "summary",
        "workload": "evaluator",
        "runs": runs.len(),
        "items": sizes().items,
        "queries": evaluator::query_count()?,
        "median": {
            "evaluate_s": time,
            "peak_rss_mb": med("peak_rss_mb"),
            "rss_before_evaluate_mb": med("rss_before_evaluate_mb"),
            "other_procs_cpu_frac": median(runs.iter().filter_map(|r| r["machine_load"]["other_procs_cpu_frac"].as_f64()).collect()),
        },
        "gflops_used": gflops,
        "floor_gflop": {"evaluate": round(flops / 1e9, 2)},
        "floor_s": {"evaluate": round(floor, 4)},
        "ratio": {"evaluate": round(time / floor, 2)},
    }))
}

fn summary(name: &str, runs: &[Value], gflops: f64) -> Value {
    let med = |key: &str| median(runs.iter().filter_map(|r| r[key].as_f64()).collect());
    let epochs = runs
        .first()
        .and_then(|r| r["epochs"].as_u64())
        .unwrap_or(10) as f64;
    let floor = |flops: f64| flops / (gflops * 1e9);
    let objects = runs
        .first()
        .and_then(|r| r["cache_objects"].as_u64())
        .map(|n| n as usize);
    let cache_flops = |name: &str| cache_flops(name, objects);
    let cache_floor = floor(cache_flops(name));
    // The epochs after the first (what the epoch time averages) and all of them (the fit).
    let e = epochs as usize;
    let epoch_gflop: Vec<f64> = (0..e).map(|i| epoch_flops_at(name, i)).collect();
    let after_first = &epoch_gflop[1.min(e.saturating_sub(1))..];
    let mean_epoch_flops = after_first.iter().sum::<f64>() / after_first.len().max(1) as f64;
    let fit_epoch_flops: f64 = epoch_gflop.iter().sum();
    let epoch_floor = floor(mean_epoch_flops);
    let fit_floor = cache_floor + floor(fit_epoch_flops);
    let (cache, epoch, fit) = (
        med("cache_fill_s"),
        med("mean_epoch_train_only_after_first_s"),
        med("fit_wall_s"),
    );
    let ratio = |t: f64, f: f64| if f > 0.0 { round(t / f, 2) } else { f64::NAN };
    json!({
        "measurement": "summary",
        "workload": name,
        "runs": runs.len(),
        "median": {
            "cache_fill_s": cache,
            "mean_epoch_train_only_after_first_s": epoch,
            "fit_wall_s": fit,
            "validation_pass_s": med("validation_pass_s"),
            "peak_rss_mb": med("peak_rss_mb"),
            "other_procs_cpu_frac": median(runs.iter().filter_map(|r| r["machine_load"]["other_procs_cpu_frac"].as_f64()).collect()),
        },
        "gflops_used": gflops,
        "floor_gflop": {
            "cache_fill": round(cache_flops(name) / 1e9, 2),
            "epoch": round(mean_epoch_flops / 1e9, 2),
            "fit": round((cache_flops(name) + fit_epoch_flops) / 1e9, 2),
        },
        "floor_s": {
            "cache_fill": round(cache_floor, 4),
            "epoch": round(epoch_floor, 4),
            "fit": round(fit_floor, 4),
        },
        "ratio": {
            "cache_fill": ratio(cache, cache_floor),
            "epoch": ratio(epoch, epoch_floor),
            "fit": ratio(fit, fit_floor),
        },
    })
}

fn main() -> Result<()> {
    init_sizes()?;
    let epochs: usize = arg("--epochs")
        .map(|e| e.parse())
        .transpose()?
        .unwrap_or(10);
    if let Some(name) = arg("--only") {
        print(&run_workload(&name, epochs)?);
        return Ok(());
    }
    if let Some(dir) = arg("--faq") {
        // One end-to-end run (500 epochs by default) in a fresh process, after the matmul
        // throughput line; the fill floors are in GFLOP, divide by that throughput.
        let faq_epochs = arg("--epochs").unwrap_or_else(|| "500".into());
        let mm = matmul_gflops()?;
        print(&mm);
        let mut args = vec!["--only", "faq", "--faq", &dir, "--epochs", &faq_epochs];
        let passed: Vec<(&str, String)> = ["--cache-dir", "--scale", "--seed"]
            .into_iter()
            .filter_map(|f| arg(f).map(|v| (f, v)))
            .collect();
        for (f, v) in &passed {
            args.extend([*f, v.as_str()]);
        }
        let output = Command::new(std::env::current_exe()?)
            .args(&args)
            .output()
            .context("running faq")?;
        if !output.status.success() {
            bail!("faq failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        let mut v: Value = serde_json::from_str(String::from_utf8(output.stdout)?.trim())?;
        let gflops = mm["gflops"].as_f64().unwrap_or(f64::NAN);
        let floor = v["fill_floor_gflop"]["train"].as_f64().unwrap_or(f64::NAN) / gflops;
        v["fill_floor_s"] = json!({"train": round(floor, 2)});
        v["fill_ratio"] = json!(round(
            v["cache_fill_s"].as_f64().unwrap_or(f64::NAN) / floor,
            2
        ));
        // End to end: the fill of every text (training and validation) plus, per epoch,
        // the head and loss of training and of the validation pass, plus the evaluations
        // before and after the fit (each a validation pass), at the measured rate.
        let gflop = |k: &str, f: &str| v[k][f].as_f64().unwrap_or(f64::NAN);
        let epochs_run = v["epochs"].as_f64().unwrap_or(f64::NAN);
        let fill = gflop("fill_floor_gflop", "train") + gflop("fill_floor_gflop", "val");
        let (train_epoch, val_pass) = (
            gflop("epoch_floor_gflop", "train"),
            gflop("epoch_floor_gflop", "validation"),
        );
        let end_to_end = fill + epochs_run * (train_epoch + val_pass) + 2.0 * val_pass;
        let floor_s = end_to_end / gflops;
        v["end_to_end_floor_gflop"] = json!(round(end_to_end, 1));
        v["end_to_end_floor_s"] = json!(round(floor_s, 2));
        v["end_to_end_ratio"] = json!(round(
            v["total_s"].as_f64().unwrap_or(f64::NAN) / floor_s,
            2
        ));
        // The same at the best of the five 2048³ timings (a matmul line that other
        // processes disturbed has a median well below its best).
        let best = mm["best_gflops"].as_f64().unwrap_or(f64::NAN);
        v["end_to_end_floor_s_at_best_gflops"] = json!(round(end_to_end / best, 2));
        v["end_to_end_ratio_at_best_gflops"] = json!(round(
            v["total_s"].as_f64().unwrap_or(f64::NAN) * best / end_to_end,
            2
        ));
        print(&v);
        return Ok(());
    }
    let all = flag("--all");
    let runs: usize = arg("--runs").map(|e| e.parse()).transpose()?.unwrap_or(3);
    let mut workloads = Vec::new();
    if all || flag("--w1") {
        workloads.extend(["w1_cached", "w1_uncached"]);
    } else if flag("--w1-cached") {
        workloads.push("w1_cached");
    }
    if all || flag("--w2") {
        workloads.push("w2");
    }
    if all || flag("--w3") {
        workloads.push("w3");
    }
    if flag("--evaluator") {
        workloads.push("evaluator");
    }
    let do_w4 = all || flag("--w4") || arg("--w4-only").is_some();
    if workloads.is_empty() && !do_w4 {
        bail!(
            "pick workloads: --w1 --w1-cached --w2 --w3 --w4 --evaluator or --all (and --runs N)"
        );
    }

    let mut mm = matmul_gflops()?;
    mm["sizes"] = sizes().json();
    print(&mm);
    let gflops = mm["gflops"].as_f64().unwrap_or(f64::NAN);
    let exe = std::env::current_exe()?;
    let mut summaries: BTreeMap<&str, Value> = BTreeMap::new();
    for name in &workloads {
        let mut results = Vec::new();
        for run in 0..runs {
            let queries = evaluator::eval_queries()?.map(|q| q.to_string());
            let output = Command::new(&exe)
                .args(["--only", name, "--epochs", &epochs.to_string()])
                .args(sizes().args())
                .args(queries.iter().flat_map(|q| ["--eval-queries", q.as_str()]))
                .output()
                .with_context(|| format!("running {name}"))?;
            if !output.status.success() {
                bail!(
                    "{name} run {run} failed: {}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
            let line = String::from_utf8(output.stdout)?;
            let mut v: Value = serde_json::from_str(line.trim())
                .with_context(|| format!("{name}: not JSON: {line}"))?;
            v["run"] = json!(run);
            print(&v);
            results.push(v);
        }
        let s = if *name == "evaluator" {
            evaluator_summary(&results, gflops)?
        } else {
            summary(name, &results, gflops)
        };
        print(&s);
        summaries.insert(name, s);
    }
    if do_w4 {
        w4::w4()?; // prints one line per loss as it is measured
    }
    Ok(())
}
