//! The profile's plots (SVG and PNG) and its files on disk.

use super::table::{layer_table, table};
use super::{Outcome, Record};
use crate::cluster::Method;
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

/// Which quantity a plot shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlotKind {
    /// Peak resident set (measured; predicted where a configuration did not fit).
    Memory,
    /// Seconds per step.
    Time,
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // DejaVu Sans, embedded by the `dejavu` crate: no system fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            plotters::style::FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Writes `<stem>.svg` and `<stem>.png`: peak memory (or step time) against
/// t, one line per method and bit width, with the fp32 step as a dashed
/// reference line. Configurations predicted not to fit appear as hollow
/// markers at their predicted peak (memory plot only).
pub fn write_plot(
    records: &[Record],
    kind: PlotKind,
    stem: &Path,
    title: &str,
) -> anyhow::Result<()> {
    register_font();
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    let mut text = String::new();
    {
        let root = plotters::backend::SVGBackend::with_string(&mut text, (900, 580));
        draw(records, kind, title, root).with_context(|| format!("drawing {}", svg.display()))?;
    }
    crate::io::write_bytes_atomic(&svg, text.as_bytes())?;
    let (w, h) = (900u32, 580u32);
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = plotters::backend::BitMapBackend::with_buffer(&mut buf, (w, h));
        draw(records, kind, title, root).with_context(|| format!("drawing {}", png.display()))?;
    }
    let mut encoded = Vec::new();
    let mut enc = png::Encoder::new(&mut encoded, w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&buf)?;
    crate::io::write_bytes_atomic(&png, &encoded)?;
    Ok(())
}

/// Ticks at 1, 2 and 5 times the powers of ten within `lo..hi`.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v >= lo && v <= hi {
                ticks.push(v);
            }
        }
        decade *= 10.0;
    }
    ticks
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    records: &[Record],
    kind: PlotKind,
    title: &str,
    backend: DB,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    use plotters::coord::combinators::BindKeyPoints;
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let root = backend.into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let (_, height) = root.dim_in_pixel();
    let (upper, lower) = root.split_vertically(height - 28);
    // (value, measured): memory plots also show the model's prediction for
    // what was not run.
    let value = |r: &Record| -> Option<(f64, bool)> {
        match (&r.outcome, kind) {
            (Outcome::Measured(m), PlotKind::Memory) => m
                .peak_rss_bytes
                .map(|b| (b as f64 / (1u64 << 30) as f64, true)),
            (Outcome::Measured(m), PlotKind::Time) => Some((m.seconds_per_step, true)),
            (Outcome::DoesNotFit { .. } | Outcome::TooSlow { .. }, PlotKind::Memory) => {
                Some((r.predicted.total() as f64 / (1u64 << 30) as f64, false))
            }
            _ => None,
        }
    };
    let points: Vec<f64> = records
        .iter()
        .filter_map(|r| value(r).map(|(v, _)| v))
        .collect();
    if points.is_empty() {
        bail!("nothing to plot");
    }
    let (lo, hi) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = ((lo * 0.7).max(1e-3), hi * 1.6);
    let mut ts: Vec<usize> = records
        .iter()
        .filter(|r| r.config.method.is_some() && !r.config.newton())
        .map(|r| r.config.iters)
        .collect();
    ts.sort_unstable();
    ts.dedup();
    let t_max = ts.last().copied().unwrap_or(30) as f64;
    let y_desc = match kind {
        PlotKind::Memory => "peak resident memory (GiB, log scale)",
        PlotKind::Time => "seconds per training step (log scale)",
    };
    let x_range = (0.8f64..t_max * 1.3)
        .log_scale()
        .with_key_points(ts.iter().map(|&t| t as f64).collect());
    let y_range = (lo..hi).log_scale().with_key_points(log_ticks(lo, hi));
    let mut chart = ChartBuilder::on(&upper)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("k-means iterations per forward pass (t, log scale)")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(210, 210, 210))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| {
            if *y >= 10.0 {
                format!("{y:.0}")
            } else {
                format!("{y}")
            }
        })
        .draw()
        .map_err(|e| err(&e))?;
    let colour = |method: Method| match method {
        Method::Dkm => RGBColor(214, 39, 40),
        Method::Idkm => RGBColor(31, 119, 180),
        Method::IdkmJfb => RGBColor(44, 160, 44),
    };
    // Methods side by side where their points coincide (same t).
    let nudge = |method: Method, bits: u32| {
        let step = if bits >= 8 { 0.08 } else { 0.04 };
        match method {
            Method::Idkm => 1.0 - step,
            Method::IdkmJfb => 1.0 + step,
            Method::Dkm => 1.0,
        }
    };
    for r in records.iter().filter(|r| r.config.method.is_none()) {
        if let Some((v, true)) = value(r) {
            let style = ShapeStyle::from(&BLACK).stroke_width(2);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(0.8, v), (t_max * 1.3, v)],
                    8,
                    6,
                    style,
                ))
                .map_err(|e| err(&e))?
                .label("fp32 step")
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2))
                });
        }
    }
    let mut drawn: Vec<(f64, f64)> = Vec::new();
    // A Newton solve has no t: its rows are lines across the plot.
    for r in records
        .iter()
        .filter(|r| r.config.newton() && r.config.converge_iters.is_none())
    {
        let (Some(method), Some((v, true))) = (r.config.method, value(r)) else {
            continue;
        };
        let c = colour(method);
        let width = if r.config.bits >= 8 { 1 } else { 3 };
        drawn.extend([(0.8, v), (t_max * 1.3, v)]);
        chart
            .draw_series(LineSeries::new(
                vec![(0.8, v), (t_max * 1.3, v)],
                ShapeStyle::from(&c).stroke_width(width),
            ))
            .map_err(|e| err(&e))?
            .label(r.config.label())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width))
            });
    }
    let mut keys: Vec<(Method, u32)> = Vec::new();
    // Steady-state rows share t with the cold ones: the table has them.
    for r in records.iter().filter(|r| {
        r.config.method.is_some() && !r.config.newton() && r.config.converge_iters.is_none()
    }) {
        let Some(method) = r.config.method else {
            continue;
        };
        let key = (method, r.config.bits);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut any_predicted = false;
    for (method, bits) in keys {
        let c = colour(method);
        let k = nudge(method, bits);
        let mut pts: Vec<(f64, f64, bool)> = records
            .iter()
            .filter(|r| {
                r.config.method == Some(method)
                    && r.config.bits == bits
                    && !r.config.newton()
                    && r.config.converge_iters.is_none()
            })
            .filter_map(|r| value(r).map(|(v, ran)| (r.config.iters as f64 * k, v, ran)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        if pts.is_empty() {
            continue;
        }
        let width = if bits >= 8 { 1 } else { 3 };
        let measured: Vec<(f64, f64)> = pts.iter().filter(|p| p.2).map(|p| (p.0, p.1)).collect();
        let predicted: Vec<(f64, f64)> = pts.iter().filter(|p| !p.2).map(|p| (p.0, p.1)).collect();
        let big = bits >= 8;
        drawn.extend(pts.iter().map(|p| (p.0, p.1)));
        chart
            .draw_series(LineSeries::new(
                measured.clone(),
                ShapeStyle::from(&c).stroke_width(width),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{method} {bits}-bit"))
            .legend(move |(x, y)| {
                let line = PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(width));
                let mark: DynElement<_, _> = if big {
                    TriangleMarker::new((x + 10, y), 6, c.filled()).into_dyn()
                } else {
                    Circle::new((x + 10, y), 4, c.filled()).into_dyn()
                };
                EmptyElement::at((0, 0)) + line + mark
            });
        let marker = |(x, y): (f64, f64), filled: bool| -> DynElement<'static, DB, (f64, f64)> {
            let style = if filled {
                ShapeStyle::from(&c).filled()
            } else {
                ShapeStyle::from(&c).stroke_width(1)
            };
            if big {
                if filled {
                    TriangleMarker::new((x, y), 7, style).into_dyn()
                } else {
                    // plotters fills triangles whatever the style: a cross instead.
                    Cross::new((x, y), 6, style.stroke_width(2)).into_dyn()
                }
            } else {
                Circle::new((x, y), 5, style).into_dyn()
            }
        };
        chart
            .draw_series(measured.iter().map(|&p| marker(p, true)))
            .map_err(|e| err(&e))?;
        if !predicted.is_empty() {
            any_predicted = true;
            let mut line = measured.last().cloned().into_iter().collect::<Vec<_>>();
            line.extend(predicted.iter().cloned());
            if line.len() > 1 {
                chart
                    .draw_series(DashedLineSeries::new(
                        line,
                        4,
                        5,
                        ShapeStyle::from(&c).stroke_width(1),
                    ))
                    .map_err(|e| err(&e))?;
            }
            chart
                .draw_series(predicted.iter().map(|&p| marker(p, false)))
                .map_err(|e| err(&e))?;
        }
    }
    // The legend takes about the top third and a quarter of the width: it
    // goes in the upper corner that hides fewer points.
    let hidden = |left: bool| {
        let at = |v: f64, lo: f64, hi: f64| (v / lo).ln() / (hi / lo).ln();
        let in_corner = |&&(x, y): &&(f64, f64)| {
            let fx = at(x, 0.8, t_max * 1.3);
            at(y, lo, hi) > 0.6 && if left { fx < 0.3 } else { fx > 0.7 }
        };
        drawn.iter().filter(in_corner).count()
    };
    let corner = if hidden(true) <= hidden(false) {
        SeriesLabelPosition::UpperLeft
    } else {
        SeriesLabelPosition::UpperRight
    };
    chart
        .configure_series_labels()
        .position(corner)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    if any_predicted {
        lower
            .draw(&Text::new(
                "hollow circles and crosses: predicted by the memory model, not run (over the memory budget or the time limit)",
                (84, 4),
                ("sans-serif", 13),
            ))
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// Writes `<dir>/<name>.json` (the records), `<name>.md` (the tables) and
/// the memory and time plots (`<name>-memory.{svg,png}`, `<name>-time.{svg,png}`).
/// Returns the paths written.
pub fn write_outputs(
    records: &[Record],
    dir: &Path,
    name: &str,
    title: &str,
    command: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let json = dir.join(format!("{name}.json"));
    let doc = serde_json::json!({ "command": command, "records": records });
    let text = serde_json::to_string_pretty(&doc)?;
    crate::io::write_bytes_atomic(&json, text.as_bytes())?;
    written.push(json);
    let md = dir.join(format!("{name}.md"));
    let text = format!(
        "{title}\n\n`{command}`\n\n{}\n{}",
        table(records),
        layer_table(records)
    );
    crate::io::write_bytes_atomic(&md, text.as_bytes())?;
    written.push(md);
    for (kind, suffix, what) in [
        (PlotKind::Memory, "memory", "peak memory"),
        (PlotKind::Time, "time", "step time"),
    ] {
        let stem = dir.join(format!("{name}-{suffix}"));
        match write_plot(records, kind, &stem, &format!("{title}: {what}")) {
            Ok(()) => {
                written.push(stem.with_extension("svg"));
                written.push(stem.with_extension("png"));
            }
            Err(e) => tracing::warn!("no {what} plot: {e:#}"),
        }
    }
    Ok(written)
}
