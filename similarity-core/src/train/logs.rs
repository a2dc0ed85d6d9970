//! Per-epoch metric logs a person can read and plot: `metrics.csv`, `metrics.jsonl` and
//! `curves.svg` (training and validation loss on the left, validation metrics on the
//! right), rewritten after every epoch. The logs directory is written as a whole by
//! [`files::write_dir`], so a reader or a crash sees the three files of one epoch, never a
//! torn or empty file nor two files that disagree; it must be new, empty, or a logs
//! directory this library wrote: a directory of other files is refused, untouched.

use std::fmt::Write as _;
use std::path::Path;

use super::EpochStats;
use crate::error::{Error, Result};
use crate::files;

/// Writes the three files for `history` as the directory `dir` (atomically, see the
/// module docs).
pub fn write_logs(dir: &Path, history: &[EpochStats]) -> Result<()> {
    write_logs_locked(dir, history, files::PathLock::acquire(dir)?).map(drop)
}

/// [`write_logs`] by a writer that holds `dir`'s lock; returns the lock.
pub(super) fn write_logs_locked(
    dir: &Path,
    history: &[EpochStats],
    lock: files::PathLock,
) -> Result<files::PathLock> {
    let metric_names: Vec<String> = history
        .iter()
        .find_map(|e| e.validation.as_ref())
        .map(|v| v.metrics.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();

    let train_names: Vec<String> = history
        .first()
        .map(|e| e.train_metrics.iter().map(|(n, _)| n.clone()).collect())
        .unwrap_or_default();
    let mut csv = String::from("epoch,train_loss,val_loss,lr,seconds");
    for n in train_names.iter().chain(&metric_names) {
        csv.push(',');
        csv.push_str(n);
    }
    csv.push('\n');
    let mut jsonl = String::new();
    for e in history {
        let val = e.validation.as_ref();
        let _ = write!(
            csv,
            "{},{},{},{},{:.4}",
            e.epoch,
            e.train_loss,
            val.map_or(String::new(), |v| v.loss.to_string()),
            e.lr,
            e.seconds
        );
        for n in &train_names {
            let value = e
                .train_metrics
                .iter()
                .find(|(m, _)| m == n)
                .map_or(String::new(), |(_, x)| x.to_string());
            let _ = write!(csv, ",{value}");
        }
        for n in &metric_names {
            let value = val
                .and_then(|v| v.metric(n))
                .map_or(String::new(), |x| x.to_string());
            let _ = write!(csv, ",{value}");
        }
        csv.push('\n');
        jsonl.push_str(
            &serde_json::to_string(e)
                .map_err(|err| Error::format(dir.join("metrics.jsonl"), err.to_string()))?,
        );
        jsonl.push('\n');
    }
    let svg = svg(history, &metric_names);
    let writer = files::DirWriter::begin_locked(dir, files::DirKind::Logs, lock)?;
    for (name, text) in [
        ("metrics.csv", &csv),
        ("metrics.jsonl", &jsonl),
        ("curves.svg", &svg),
    ] {
        let path = writer.path().join(name);
        std::fs::write(&path, text).map_err(|e| Error::io("cannot write", &path, e))?;
    }
    writer.commit()
}

const W: f64 = 420.0;
const H: f64 = 260.0;
const PAD: f64 = 40.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

fn svg(history: &[EpochStats], metric_names: &[String]) -> String {
    let epochs: Vec<f64> = history.iter().map(|e| e.epoch as f64).collect();
    let losses = vec![
        (
            "train_loss".to_string(),
            history
                .iter()
                .map(|e| Some(e.train_loss))
                .collect::<Vec<_>>(),
        ),
        (
            "val_loss".to_string(),
            history
                .iter()
                .map(|e| e.validation.as_ref().map(|v| v.loss))
                .collect(),
        ),
    ];
    let metrics: Vec<(String, Vec<Option<f64>>)> = metric_names
        .iter()
        .map(|n| {
            (
                n.clone(),
                history
                    .iter()
                    .map(|e| e.validation.as_ref().and_then(|v| v.metric(n)))
                    .collect(),
            )
        })
        .collect();
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        2.0 * W
    );
    panel(&mut out, 0.0, "loss", &epochs, &losses);
    panel(&mut out, W, "validation metrics", &epochs, &metrics);
    out.push_str("</svg>\n");
    out
}

fn panel(
    out: &mut String,
    x0: f64,
    title: &str,
    xs: &[f64],
    series: &[(String, Vec<Option<f64>>)],
) {
    let values = series
        .iter()
        .flat_map(|(_, v)| v.iter().flatten().copied())
        .filter(|v| v.is_finite());
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
        (l.min(v), h.max(v))
    });
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"16\" font-weight=\"bold\">{title}</text>",
        x0 + PAD
    );
    let _ = writeln!(
        out,
        "<rect x=\"{}\" y=\"{PAD}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>",
        x0 + PAD,
        W - 2.0 * PAD,
        H - 2.0 * PAD
    );
    if !lo.is_finite() {
        return;
    }
    let (lo, hi) = if hi > lo {
        (lo, hi)
    } else {
        (lo - 0.5, hi + 0.5)
    };
    let x_max = xs.last().copied().unwrap_or(0.0).max(1.0);
    let px = |x: f64| x0 + PAD + (W - 2.0 * PAD) * x / x_max;
    let py = |y: f64| H - PAD - (H - 2.0 * PAD) * (y - lo) / (hi - lo);
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{hi:.3}</text>",
        x0 + PAD - 4.0,
        PAD + 4.0
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{lo:.3}</text>",
        x0 + PAD - 4.0,
        H - PAD
    );
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">epoch</text>",
        x0 + W / 2.0,
        H - 8.0
    );
    for (i, (name, ys)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = xs
            .iter()
            .zip(ys)
            .filter_map(|(x, y)| {
                y.filter(|v| v.is_finite())
                    .map(|y| format!("{:.1},{:.1}", px(*x), py(y)))
            })
            .collect();
        if points.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            points.join(" ")
        );
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{name}</text>",
            x0 + W - PAD - 110.0,
            PAD + 14.0 * (i as f64 + 1.0)
        );
    }
}
