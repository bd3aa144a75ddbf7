//! Charts as PNG files, with axes, ticks, labels, units and legends (plotters, drawn into an
//! image buffer; the DejaVu font is embedded so that no system font is needed):
//! - [`panels_png`]: line charts of per-epoch series side by side (a run's `metrics.png`,
//!   several runs' curves for `invaspread plot`);
//! - [`scatter_png`]: a 2-D projection of embeddings coloured by class (`invaspread embed --png`).
//!
//! Scales are chosen to compare, not to fill the panel: kNN accuracy is drawn on whole tens of
//! percent and shared by every series of a chart, so a change of 2 points looks like one.

use std::ops::Range;
use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::durable::write_atomically;
use crate::error::{Error, Result};

const FONT: &str = "sans-serif";

/// Colours of the series, in order (Tableau 10, readable on white and by most colour-blind
/// readers).
const PALETTE: [RGBColor; 10] = [
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
];

/// The colour of series `i`.
pub fn colour(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Registers the embedded font once (plotters' ab_glyph text looks fonts up by name).
fn font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            "internal: the embedded DejaVu font did not load",
        ))
    }
}

/// A drawing failure as the crate's error, naming the file.
fn failed(path: &Path) -> impl Fn(&dyn std::fmt::Display) -> Error + '_ {
    move |e| Error::invalid(format!("drawing {}: {e}", path.display()))
}

/// Draws with `draw` on a white `w` x `h` canvas and writes it to `path` as a PNG (atomically).
fn render(
    path: &Path,
    (w, h): (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
) -> Result<()> {
    font()?;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| failed(path)(&e))?;
        draw(&root)?;
        root.present().map_err(|e| failed(path)(&e))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf)
        .ok_or_else(|| Error::invalid("internal: the canvas has the wrong size"))?;
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::invalid(format!("encoding {}: {e}", path.display())))?;
    write_atomically(path, &bytes)
}

/// A named line of (x, y) points.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// The smallest range of whole multiples of `step` holding every value (one step where they
/// are all equal), clipped to `clip`.
fn range_in_steps(values: impl Iterator<Item = f64>, step: f64, clip: Range<f64>) -> Range<f64> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if lo > hi {
        return clip.start.max(0.0)..(clip.start.max(0.0) + step).min(clip.end);
    }
    let mut lo = (lo / step).floor() * step;
    let mut hi = (hi / step).ceil() * step;
    if hi <= lo {
        hi = lo + step;
    }
    lo = lo.max(clip.start);
    hi = hi.min(clip.end);
    if hi <= lo {
        lo = (hi - step).max(clip.start);
    }
    lo..hi
}

/// A step of 1, 2 or 5 times a power of ten that cuts `span` into about 4 to 10 parts.
fn nice_step(span: f64) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let power = 10f64.powf(span.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power / 10.0)
        .find(|&s| span / s <= 10.0)
        .unwrap_or(power)
}

/// Decimals that tell apart the ticks of an axis spanning `span` (about 10 ticks).
fn decimals(span: f64) -> usize {
    let step = nice_step(span);
    if step >= 1.0 {
        0
    } else {
        (-step.log10().floor()) as usize
    }
}

/// A tick label with `decimals` decimals, never "-0".
fn tick(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.starts_with('-') && s[1..].chars().all(|c| c == '0' || c == '.') {
        s[1..].to_string()
    } else {
        s
    }
}

/// The kNN accuracy range in percent: whole tens holding every series.
fn percent_range(series: &[Series]) -> Range<f64> {
    let values = series.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    range_in_steps(values, 10.0, 0.0..100.0)
}

/// The epoch axis: 0 to the last epoch of any series (at least 1).
fn epoch_range(series: &[Series]) -> Range<f64> {
    let last = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    0.0..last
}

/// One chart of `series` on `area`: caption, axes with ticks and their descriptions, a dot at
/// every point, the last point's value written beside it, and a legend when there is more than
/// one series.
#[allow(clippy::too_many_arguments)] // a chart's caption, axes, their names, and the series
fn line_chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    path: &Path,
    caption: &str,
    x: Range<f64>,
    y: Range<f64>,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
) -> Result<()> {
    let err = failed(path);
    let epochs = x.end.round() as usize;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 20))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y.clone())
        .map_err(|e| err(&e))?;
    let decimals = if nice_step(y.end - y.start) < 1.0 {
        2
    } else {
        0
    };
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(epochs.clamp(2, 11) + 1)
        .x_label_formatter(&epoch_tick)
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| err(&e))?;
    let labels = legend_labels(series.len());
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let drawn = chart
            .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| err(&e))?;
        match labels.get(i) {
            Some(Legend::Series) => {
                drawn.label(s.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                });
            }
            Some(Legend::More(more)) => {
                drawn
                    .label(format!("... and {more} more runs"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], WHITE));
            }
            None => {}
        }
        chart
            .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| err(&e))?;
        if let Some(&(px, py)) = s.points.last() {
            let text = format!("{py:.2}");
            let style = TextStyle::from((FONT, 13).into_font()).color(&c);
            // Above and left of the point, so the right edge never clips it.
            let label = EmptyElement::at((px, py)) + Text::new(text, (-36, -20), style);
            chart
                .draw_series(std::iter::once(label))
                .map_err(|e| err(&e))?;
        }
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .draw()
            .map_err(|e| err(&e))?;
    }
    Ok(())
}

/// At most this many legend lines fit a 420-pixel panel (14-point text).
const LEGEND_LINES: usize = 14;

/// What the legend shows of series `i`.
#[derive(Debug, PartialEq)]
enum Legend {
    Series,
    /// The last line, in place of this and the remaining `usize` series.
    More(usize),
}

/// The legend lines of `n` series: every series while they fit, else the first
/// `LEGEND_LINES - 1` and a line counting the rest (50 runs cut the legend at 35 before).
fn legend_labels(n: usize) -> Vec<Legend> {
    if n <= LEGEND_LINES {
        return (0..n).map(|_| Legend::Series).collect();
    }
    let mut labels: Vec<Legend> = (0..LEGEND_LINES - 1).map(|_| Legend::Series).collect();
    labels.push(Legend::More(n - (LEGEND_LINES - 1)));
    labels
}

/// An epoch axis's tick: whole epochs only (a 1-epoch chart put a tick at 0.5 and read it
/// "0, 0, 1").
fn epoch_tick(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// How a panel's y axis is scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    /// Percent on whole tens within 0..100, shared by every series of the panel.
    Percent,
    /// Whole multiples of a 1-2-5 step from the values' own range.
    Fitted,
}

/// One chart: a caption, the axes' descriptions, the series (x is the epoch), the y scale.
#[derive(Debug, Clone)]
pub struct Panel {
    pub caption: String,
    pub x_desc: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    pub scale: Scale,
}

/// The panels side by side in one PNG (`width` pixels each), sharing the epoch axis.
pub fn panels_png(panels: &[Panel], (width, height): (u32, u32), path: &Path) -> Result<()> {
    let all: Vec<Series> = panels.iter().flat_map(|p| p.series.clone()).collect();
    let x = epoch_range(&all);
    let count = panels.len().max(1) as u32;
    render(path, (width * count, height), |root| {
        let areas = root.split_evenly((1, count as usize));
        for (panel, area) in panels.iter().zip(&areas) {
            let y = match panel.scale {
                Scale::Percent => percent_range(&panel.series),
                Scale::Fitted => {
                    let values = || {
                        panel
                            .series
                            .iter()
                            .flat_map(|s| s.points.iter().map(|p| p.1))
                    };
                    let (lo, hi) = values()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                            (a.min(v), b.max(v))
                        });
                    range_in_steps(
                        values(),
                        nice_step(hi - lo),
                        f64::NEG_INFINITY..f64::INFINITY,
                    )
                }
            };
            line_chart(
                area,
                path,
                &panel.caption,
                x.clone(),
                y,
                &panel.x_desc,
                &panel.y_desc,
                &panel.series,
            )?;
        }
        Ok(())
    })
}

/// `embed --png`: 2-D points coloured by class, with a legend of the class names.
pub fn scatter_png(
    points: &[(f64, f64)],
    labels: &[i64],
    classes: &[String],
    caption: &str,
    (x_desc, y_desc): (&str, &str),
    path: &Path,
) -> Result<()> {
    let err = failed(path);
    let span = |f: &dyn Fn(&(f64, f64)) -> f64| {
        let (lo, hi) = points
            .iter()
            .map(f)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        let pad = if hi > lo { 0.05 * (hi - lo) } else { 1.0 };
        if lo.is_finite() {
            (lo - pad)..(hi + pad)
        } else {
            -1.0..1.0
        }
    };
    let (xr, yr) = (span(&|p| p.0), span(&|p| p.1));
    let (xd, yd) = (decimals(xr.end - xr.start), decimals(yr.end - yr.start));
    render(path, (900, 760), |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(caption, (FONT, 20))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(xr, yr)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_label_formatter(&|v| tick(*v, xd))
            .y_label_formatter(&|v| tick(*v, yd))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(|e| err(&e))?;
        for (c, name) in classes.iter().enumerate() {
            let colour = colour(c);
            let members = points
                .iter()
                .zip(labels)
                .filter(|(_, &l)| l == c as i64)
                .map(|(&p, _)| Circle::new(p, 2, colour.mix(0.7).filled()));
            chart
                .draw_series(members)
                .map_err(|e| err(&e))?
                .label(name.clone())
                .legend(move |(x, y)| Circle::new((x + 6, y), 4, colour.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_whole_steps_that_hold_every_value() {
        let r = range_in_steps([84.96, 82.73, 84.40].into_iter(), 10.0, 0.0..100.0);
        assert_eq!(
            r,
            80.0..90.0,
            "a 2-point dip is a fifth of the panel, not all of it"
        );
        assert_eq!(
            range_in_steps([100.0].into_iter(), 10.0, 0.0..100.0),
            90.0..100.0
        );
        assert_eq!(range_in_steps([].into_iter(), 10.0, 0.0..100.0), 0.0..10.0);
        assert_eq!(nice_step(3.7), 0.5);
        assert_eq!(nice_step(0.08), 0.01);
        assert_eq!(nice_step(45.0), 5.0);
        assert_eq!((decimals(1.6), decimals(0.05), decimals(30.0)), (1, 3, 0));
        assert_eq!(
            (tick(-0.01, 1), tick(-0.25, 1), tick(3.0, 0)),
            ("0.0".into(), "-0.2".into(), "3".into())
        );
    }

    #[test]
    fn legends_fit_and_epoch_ticks_are_whole() {
        assert_eq!(
            legend_labels(3),
            [Legend::Series, Legend::Series, Legend::Series]
        );
        let fifty = legend_labels(50);
        assert_eq!(fifty.len(), LEGEND_LINES);
        assert_eq!(
            fifty[LEGEND_LINES - 1],
            Legend::More(50 - (LEGEND_LINES - 1))
        );
        let ticks: Vec<String> = [0.0, 0.5, 1.0].iter().map(epoch_tick).collect();
        assert_eq!(ticks, ["0", "", "1"]);
    }

    /// Dark pixels (text, axes, ticks) in a rectangle of a decoded PNG.
    fn dark_pixels(img: &image::RgbImage, xs: Range<u32>, ys: Range<u32>) -> usize {
        ys.flat_map(|y| xs.clone().map(move |x| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 90))
            .count()
    }

    #[test]
    fn a_chart_has_axes_tick_labels_and_its_series() {
        let path = std::env::temp_dir().join(format!("invaspread-plot-{}.png", std::process::id()));
        let series = vec![
            Series {
                label: "a".into(),
                points: vec![(0.0, 10.0), (1.0, 55.0), (2.0, 62.5)],
            },
            Series {
                label: "b".into(),
                points: vec![(0.0, 10.0), (1.0, 30.0), (2.0, 41.0)],
            },
        ];
        let panel = Panel {
            caption: "kNN".into(),
            x_desc: "epoch".into(),
            y_desc: "accuracy (%)".into(),
            series,
            scale: Scale::Percent,
        };
        panels_png(&[panel], (600, 400), &path).unwrap();
        let img = image::open(&path).unwrap().to_rgb8();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(img.dimensions(), (600, 400));
        assert!(
            dark_pixels(&img, 0..70, 40..340) > 200,
            "y tick labels and description"
        );
        let bottom = dark_pixels(&img, 80..580, 340..400);
        assert!(bottom > 100, "x tick labels and description: {bottom}");
        assert!(dark_pixels(&img, 200..400, 0..35) > 50, "the caption");
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        let orange = img.pixels().filter(|p| p.0 == [255, 127, 14]).count();
        assert!(
            blue > 300 && orange > 300,
            "both series drawn: {blue} {orange}"
        );
    }
}
