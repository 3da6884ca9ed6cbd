//! Each program's cost per packet on its common path, by `BPF_PROG_TEST_RUN`'s
//! clock (the golden fixture's `bench_each_program_per_packet`, release
//! build), as a report section and a plot.

use std::{fmt::Write as _, path::Path};

use anyhow::Result;

use super::golden_bench;

/// The goal per program and packet.
const GOAL_NS: f64 = 100.0;

/// (program:case, ns per packet), in the benchmark's order.
pub(super) fn measure() -> Result<Vec<(String, f64)>> {
    let figures = golden_bench(
        "golden_services",
        "bench_each_program_per_packet",
        "BENCH programs",
    )?;
    Ok(figures.into_iter().collect())
}

pub(super) fn report(figures: &[(String, f64)]) -> String {
    let mut r = String::from(
        "\n## Per packet, each program (TEST_RUN)\n\n\
         `BPF_PROG_TEST_RUN`'s own clock, the median of 100 calls of 250 runs on one packet of an established flow (the first run creates its state). Goal: under 100 ns per packet.\n\n\
         | program | path | ns per packet | goal |\n|---|---|---|---|\n",
    );
    for (key, ns) in figures {
        let (prog, case) = key.split_once(':').unwrap_or((key, ""));
        let verdict = if *ns < GOAL_NS {
            "meets".to_owned()
        } else {
            format!("MISSES by {:.0} ns ({:.1}×)", ns - GOAL_NS, ns / GOAL_NS)
        };
        let _ = writeln!(
            r,
            "| {prog} | {} | {ns:.0} | {verdict} |",
            case.replace('-', " ")
        );
    }
    r
}

/// Horizontal bars, one per program and path, with the goal as a line.
pub(super) fn plot(figures: &[(String, f64)], path: &Path) -> Result<()> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("{e}");
    let n = figures.len();
    let top = figures.iter().map(|(_, v)| *v).fold(GOAL_NS, f64::max) * 1.15;
    let root = SVGBackend::new(path, (1000, 80 + 36 * n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Per packet, each program (TEST_RUN, median; line: the 100 ns goal)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(330)
        .build_cartesian_2d(0f64..top, 0f64..n as f64)
        .map_err(|e| err(&e))?;
    let names: Vec<String> = figures.iter().map(|(k, _)| k.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n * 2 + 1)
        .y_label_formatter(&|y| {
            let i = y.floor() as usize;
            if (y - i as f64 - 0.5).abs() < 1e-6 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("ns per packet")
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(figures.iter().enumerate().map(|(i, (_, v))| {
            let color = if *v < GOAL_NS { GREEN } else { RED };
            Rectangle::new(
                [(0.0, i as f64 + 0.15), (*v, i as f64 + 0.85)],
                color.mix(0.8).filled(),
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(figures.iter().enumerate().map(|(i, (_, v))| {
            Text::new(
                format!("{v:.0}"),
                (*v + top * 0.01, i as f64 + 0.35),
                ("sans-serif", 13),
            )
        }))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new(
            [(GOAL_NS, 0.0), (GOAL_NS, n as f64)],
            BLACK.stroke_width(2),
        ))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
