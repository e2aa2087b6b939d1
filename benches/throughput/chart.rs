//! The benchmark's PNG charts, drawn with plotters' bitmap backend. Text is drawn with
//! ab_glyph from DejaVu Sans embedded by the `dejavu` crate: no system font needed.

use std::error::Error;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const FONT: &str = "sans-serif";
const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
];

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("DejaVu Sans from the dejavu crate is a valid font"));
    });
}

/// One scenario's figures: per contender (by name), docs/s and p99 ms.
pub struct Group {
    pub scenario: String,
    pub values: Vec<(&'static str, f64, f64)>,
}

/// Grouped bars: docs/s (left) and p99 latency (right) by scenario and contender.
pub fn throughput(path: &Path, title: &str, groups: &[Group]) -> Result<(), Box<dyn Error>> {
    register_font();
    let root = BitMapBackend::new(path, (1400, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 22))?;
    let panels = root.split_evenly((1, 2));
    bars(
        &panels[0],
        "documents per second (log scale)",
        groups,
        |v| v.1,
    )?;
    bars(&panels[1], "p99 latency, ms (log scale)", groups, |v| v.2)?;
    root.present()?;
    Ok(())
}

fn bars(
    area: &DrawingArea<BitMapBackend, Shift>,
    caption: &str,
    groups: &[Group],
    pick: fn(&(&'static str, f64, f64)) -> f64,
) -> Result<(), Box<dyn Error>> {
    let all: Vec<f64> = groups
        .iter()
        .flat_map(|g| g.values.iter().map(pick))
        .filter(|v| *v > 0.0)
        .collect();
    // Room below the lowest bar, and above the highest for the legend.
    let lo = all.iter().copied().fold(f64::INFINITY, f64::min).min(1e9) / 3.0;
    let hi = all.iter().copied().fold(1.0, f64::max) * 12.0;
    let n = groups.len();
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, (lo..hi).log_scale())?;
    let label = |x: &f64| {
        let i = x.round();
        match groups.get(i as usize) {
            Some(g) if (x - i).abs() < 1e-6 && i >= 0.0 => g.scenario.clone(),
            _ => String::new(),
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .y_label_formatter(&|y| short(*y))
        .label_style((FONT, 14))
        .draw()?;
    let contenders: Vec<&'static str> = groups
        .iter()
        .flat_map(|g| g.values.iter().map(|v| v.0))
        .fold(Vec::new(), |mut names, name| {
            if !names.contains(&name) {
                names.push(name);
            }
            names
        });
    let width = 0.8 / contenders.len().max(1) as f64;
    let text = TextStyle::from((FONT, 12).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (c, name) in contenders.iter().enumerate() {
        let color = COLORS[c % COLORS.len()];
        let placed: Vec<(f64, f64)> = groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                let v = g.values.iter().find(|v| v.0 == *name).map(pick)?;
                Some((i as f64 - 0.4 + c as f64 * width, v))
            })
            .collect();
        chart
            .draw_series(placed.iter().map(|&(x, v)| {
                Rectangle::new([(x, lo), (x + width * 0.9, v.max(lo))], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(
            placed
                .iter()
                .map(|&(x, v)| Text::new(short(v), (x + width * 0.45, v.max(lo)), text.clone())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 14))
        .draw()?;
    Ok(())
}

/// 1200000 → "1.2M", 45300 → "45k", 12.3 → "12", 0.84 → "0.8".
fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// One soak window: seconds since the start, replies per second, worker RSS MiB, p99
/// ms, worker CPU µs per request.
pub struct Sample {
    pub t: f64,
    pub rate: f64,
    pub rss_mib: f64,
    pub p99_ms: f64,
    pub cpu_us: f64,
}

/// The soak over time: replies per second, the worker's RSS, the p99 latency and the
/// worker's CPU per request, one panel each.
pub fn soak(path: &Path, title: &str, samples: &[Sample]) -> Result<(), Box<dyn Error>> {
    register_font();
    let root = BitMapBackend::new(path, (1200, 1100)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 22))?;
    let panels = root.split_evenly((4, 1));
    line(
        &panels[0],
        "worker RSS, MiB",
        samples,
        |s| s.rss_mib,
        COLORS[0],
    )?;
    line(
        &panels[1],
        "p99 latency of the window, ms",
        samples,
        |s| s.p99_ms,
        COLORS[1],
    )?;
    line(
        &panels[2],
        "worker CPU per request, µs",
        samples,
        |s| s.cpu_us,
        COLORS[2],
    )?;
    let gray = RGBColor(90, 90, 90);
    line(&panels[3], "replies per second", samples, |s| s.rate, gray)?;
    root.present()?;
    Ok(())
}

fn line(
    area: &DrawingArea<BitMapBackend, Shift>,
    caption: &str,
    samples: &[Sample],
    pick: fn(&Sample) -> f64,
    color: RGBColor,
) -> Result<(), Box<dyn Error>> {
    let end = samples.last().map_or(10.0, |s| s.t).max(10.0);
    let hi = samples.iter().map(pick).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..hi)?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .draw()?;
    chart.draw_series(LineSeries::new(
        samples.iter().map(|s| (s.t, pick(s))),
        color.stroke_width(2),
    ))?;
    chart.draw_series(
        samples
            .iter()
            .map(|s| Circle::new((s.t, pick(s)), 3, color.filled())),
    )?;
    Ok(())
}
