//! The HTML report of a `shopmesh load` run: the tables of the terminal output and three plots
//! (latency over time, throughput over time, latency by percentile), inline SVG drawn by
//! plotters. One self-contained file: no script, nothing loaded from elsewhere.

use plotters::prelude::*;

use super::LoadResult;

/// One colour per step of the mix (12), so no two lines share one.
const PALETTE: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 215, 0),
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole page.
pub(super) fn html(r: &LoadResult) -> anyhow::Result<String> {
    let mut page = String::new();
    let title = format!(
        "shopmesh load: {} {}, {:.1} {}s/s",
        escape(&format!("{:?}", r.scenario).to_lowercase()),
        match r.mode {
            "open" => format!("open loop at {:.0}/s", r.rate.unwrap_or_default()),
            _ => format!("closed loop, {} users", r.users.unwrap_or_default()),
        },
        r.iterations_per_second,
        r.iteration
    );
    page.push_str(&format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}\
         table{{border-collapse:collapse;margin:1em 0}}td,th{{padding:2px 10px;text-align:right}}\
         th{{border-bottom:1px solid #888}}td:first-child,th:first-child{{text-align:left}}</style>\
         </head><body><h1>{title}</h1><p>{} against {}, {:.0} s measured after {:.0} s warm-up, \
         {} cores; {} errors.</p>",
        r.iterations,
        escape(&r.url),
        r.duration_secs,
        r.warmup_secs,
        r.cores,
        r.errors
    ));
    page.push_str(
        "<h2>Steps</h2><table><tr><th>step</th><th>count</th><th>per s</th><th>p50 ms</th>\
         <th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>",
    );
    for s in &r.steps {
        page.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td>\
             <td>{:.2}</td><td>{:.2}</td></tr>",
            s.step, s.count, s.per_second, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
        ));
    }
    page.push_str("</table>");
    if !r.error_counts.is_empty() {
        page.push_str("<h2>Errors</h2><table><tr><th>step</th><th>status</th><th>count</th></tr>");
        for e in &r.error_counts {
            page.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.step,
                match e.status {
                    0 => "no answer".to_owned(),
                    super::NOT_SENT => "not sent (too many in flight)".to_owned(),
                    status => status.to_string(),
                },
                e.count
            ));
        }
        page.push_str("</table>");
    }
    if !r.processes.is_empty() {
        page.push_str(&format!(
            "<h2>Processes</h2><table><tr><th>process</th><th>CPU s</th><th>CPU ms per {}</th>\
             <th>RSS MiB</th><th>private MiB</th></tr>",
            r.iteration
        ));
        for p in &r.processes {
            page.push_str(&format!(
                "<tr><td>{}</td><td>{:.2}</td><td>{:.3}</td><td>{:.1}</td><td>{}</td></tr>",
                escape(&p.process),
                p.cpu_seconds,
                p.cpu_ms_per_iteration,
                p.rss_mib,
                p.private_mib
                    .map_or_else(|| "-".to_owned(), |mib| format!("{mib:.1}"))
            ));
        }
        page.push_str("</table>");
        if let Some(total) = r.shop_cpu_ms_per_iteration {
            page.push_str(&format!(
                "<p>Shop CPU per {}: <b>{total:.3} ms</b> (the load generator excluded).</p>",
                r.iteration
            ));
        }
    }
    page.push_str(&format!(
        "<h2>Latency over time ({})</h2>{}",
        r.iteration,
        over_time(r)?
    ));
    page.push_str(&format!("<h2>Throughput over time</h2>{}", throughput(r)?));
    page.push_str(&format!(
        "<h2>Latency by percentile</h2>{}</body></html>",
        percentiles(r)?
    ));
    Ok(page)
}

fn over_time(r: &LoadResult) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 360)).into_drawing_area();
        root.fill(&WHITE)?;
        let seconds = r.timeline.len().max(1) as f64;
        let top = r.timeline.iter().map(|s| s.p99_ms).fold(1.0_f64, f64::max) * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..seconds, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("second of the run")
            .y_desc("ms")
            .draw()?;
        for (i, (name, pick)) in [
            (
                "p50",
                (|s: &super::SecondResult| s.p50_ms) as fn(&super::SecondResult) -> f64,
            ),
            ("p99", |s| s.p99_ms),
        ]
        .into_iter()
        .enumerate()
        {
            let color = PALETTE[i];
            chart
                .draw_series(LineSeries::new(
                    r.timeline.iter().map(|s| (s.second as f64 + 0.5, pick(s))),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

fn throughput(r: &LoadResult) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 280)).into_drawing_area();
        root.fill(&WHITE)?;
        let seconds = r.timeline.len().max(1) as f64;
        let top = r.timeline.iter().map(|s| s.count).max().unwrap_or(1).max(1) as f64 * 1.2;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..seconds, 0.0..top)?;
        chart
            .configure_mesh()
            .x_desc("second of the run")
            .y_desc(format!("{}s/s", r.iteration))
            .draw()?;
        chart.draw_series(LineSeries::new(
            r.timeline
                .iter()
                .map(|s| (s.second as f64 + 0.5, s.count as f64)),
            PALETTE[2].stroke_width(2),
        ))?;
        root.present()?;
    }
    Ok(svg)
}

/// x: "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99), so the tail gets the room.
fn nines(percentile: f64) -> f64 {
    let rest = 1.0 - percentile / 100.0;
    if rest <= 0.0001 { 4.0 } else { -rest.log10() }
}

fn percentiles(r: &LoadResult) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 400)).into_drawing_area();
        root.fill(&WHITE)?;
        let top = r
            .steps
            .iter()
            .flat_map(|s| s.curve.iter().map(|(_, ms)| *ms))
            .fold(1.0_f64, f64::max)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..4.2, (0.01..top).log_scale())?;
        chart
            .configure_mesh()
            .x_labels(5)
            .x_label_formatter(&|x: &f64| match x.round() as i32 {
                0 => "p0".to_owned(),
                1 => "p90".to_owned(),
                2 => "p99".to_owned(),
                3 => "p99.9".to_owned(),
                _ => "p99.99".to_owned(),
            })
            .x_desc("percentile")
            .y_desc("ms (log)")
            .draw()?;
        for (i, step) in r.steps.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    step.curve.iter().map(|(p, ms)| (nines(*p), ms.max(0.01))),
                    color.stroke_width(2),
                ))?
                .label(step.step)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::nines;

    #[test]
    fn the_tail_gets_its_own_decade() {
        assert!((nines(0.0) - 0.0).abs() < 1e-9);
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nines(100.0), 4.0);
    }
}
