//! PNG plots of a run (`--plot DIR`).

use crate::report::Report;
use plotters::prelude::*;
use std::path::Path;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn load_font() -> Result<(), String> {
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            // Plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{p} is not a usable font"));
        }
    }
    Err("plots need DejaVuSans.ttf (Debian package fonts-dejavu-core)".into())
}

type Res = Result<(), Box<dyn std::error::Error>>;

/// Writes `latency-cdf.png`, `throughput.png` and `scaling.png` into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Res {
    load_font()?;
    std::fs::create_dir_all(dir)?;
    if !report.latency.is_empty() {
        latency_cdf(report, &dir.join("latency-cdf.png"))?;
    }
    if !report.throughput.is_empty() {
        throughput(report, &dir.join("throughput.png"))?;
    }
    if !report.scaling.is_empty() {
        scaling(report, &dir.join("scaling.png"))?;
    }
    Ok(())
}

fn latency_cdf(report: &Report, path: &Path) -> Res {
    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = report
        .latency
        .iter()
        .map(|r| r.latency.quantile(0.999))
        .max()
        .unwrap_or(1000) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption("Round-trip latency CDF (log scale)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((20f64..max * 1.2).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("nanoseconds")
        .y_desc("fraction of round trips")
        .draw()?;
    for (i, r) in report.latency.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(r.latency.cdf(), color.stroke_width(2)))?
            .label(r.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn throughput(report: &Report, path: &Path) -> Res {
    let root = BitMapBackend::new(path, (900, 550)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_b = report.throughput.iter().map(|r| r.batch).max().unwrap_or(1) as f64;
    let max_t = report
        .throughput
        .iter()
        .map(|r| r.ops_per_sec)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("NOP throughput vs batch size", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..max_b * 1.5).log_scale(),
            (1e4f64..max_t * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("packets per doorbell / per io_uring_enter")
        .y_desc("ops per second")
        .draw()?;
    for (i, system) in ["userq", "io_uring"].iter().enumerate() {
        let pts: Vec<(f64, f64)> = report
            .throughput
            .iter()
            .filter(|r| r.system == *system)
            .map(|r| (r.batch as f64, r.ops_per_sec))
            .collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(*system)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn scaling(report: &Report, path: &Path) -> Res {
    let root = BitMapBackend::new(path, (900, 550)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_t = report
        .scaling
        .iter()
        .map(|r| r.packets_per_sec)
        .fold(1.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Aggregate NOP round-trip throughput vs queues",
            ("sans-serif", 24),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..400f64).log_scale(),
            (1e3f64..max_t * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("queues")
        .y_desc("packets per second")
        .draw()?;
    let mut procs: Vec<usize> = report.scaling.iter().map(|r| r.procs).collect();
    procs.sort_unstable();
    procs.dedup();
    for (i, p) in procs.into_iter().enumerate() {
        let pts: Vec<(f64, f64)> = report
            .scaling
            .iter()
            .filter(|r| r.procs == p)
            .map(|r| (r.queues as f64, r.packets_per_sec))
            .collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(format!("{p} process(es)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.into_iter().map(|pt| Circle::new(pt, 4, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
