//! PNG charts of rates over time (plotters, DejaVu Sans from the system).

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn ensure_font() -> Result<()> {
    static ONCE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable font"));
            }
        }
        Err("no DejaVuSans.ttf found (scripts/bootstrap installs fonts-dejavu-core)".into())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// One series: label, (time s, value) points, optional expected level.
#[derive(Clone, Debug)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub expected: Option<f64>,
}

/// One panel per (title, lines), side by side, sharing the y range; x is
/// time in seconds.
pub fn rate_panels(
    path: &Path,
    title: &str,
    y_label: &str,
    panels: &[(String, Vec<Line>)],
) -> Result<()> {
    line_panels(path, title, "time (s)", y_label, panels)
}

/// One panel per (title, lines), side by side, sharing the y range.
pub fn line_panels(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    panels: &[(String, Vec<Line>)],
) -> Result<()> {
    ensure_font()?;
    let width = 620 * panels.len().max(1) as u32;
    let root = BitMapBackend::new(path, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let root = root
        .titled(title, ("sans-serif", 22))
        .map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    let x_max = panels
        .iter()
        .flat_map(|(_, ls)| ls.iter().flat_map(|l| l.points.iter().map(|p| p.0)))
        .fold(1.0f64, f64::max);
    let y_max = panels
        .iter()
        .flat_map(|(_, ls)| {
            ls.iter()
                .flat_map(|l| l.points.iter().map(|p| p.1).chain(l.expected))
        })
        .fold(1.0f64, f64::max)
        * 1.1;
    let palette = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
    ];
    for (area, (name, lines)) in areas.iter().zip(panels) {
        let mut chart = ChartBuilder::on(area)
            .caption(name, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, l) in lines.iter().enumerate() {
            let color = palette[i % palette.len()];
            chart
                .draw_series(LineSeries::new(
                    l.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(l.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            if let Some(e) = l.expected {
                let dashes = (0..(x_max * 4.0) as usize)
                    .filter(|k| k % 2 == 0)
                    .map(move |k| {
                        PathElement::new(
                            vec![(k as f64 / 4.0, e), ((k as f64 + 1.0) / 4.0, e)],
                            color,
                        )
                    });
                chart.draw_series(dashes).map_err(|e| anyhow!("{e}"))?;
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
