//! A project's trends as SVG, rendered here (no script, no network): the duration of each of its
//! last builds (one bar each, oldest on the left) and the success rate of consecutive groups of
//! them. Pure functions of their input; the server's `projects.rs` serves them.
//!
//! Each chart is an accessible image (`role="img"`, `<title>` and `<desc>` saying what it
//! shows), colours come from CSS classes (prefixed `tr-`) whose `<style>` follows
//! `prefers-color-scheme`, and a bar's colour is never the only sign: a failed build's bar is
//! hatched (an outline over stripes, where a success is solid) and its `<title>` says "failed".

use crate::body::esc;
use std::fmt::Write as _;

/// One build, as the charts read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Build {
    /// The job's ID (its tooltip shows the first 12 characters).
    pub(crate) id: String,
    /// `StartedAt`, shown in the tooltip.
    pub(crate) started_at: String,
    /// Nanoseconds (negative: unknown, drawn as 0).
    pub(crate) duration_ns: i64,
    /// Exit code 0 and no build error.
    pub(crate) ok: bool,
}

/// Width and height of a chart.
pub(crate) const WIDTH: u32 = 640;
pub(crate) const HEIGHT: u32 = 220;
/// The plot area: left, top, right, bottom.
const LEFT: f64 = 56.0;
const TOP: f64 = 16.0;
const RIGHT: f64 = 632.0;
const BOTTOM: f64 = 186.0;

const STYLE: &str = "<style>\
.tr-bg{fill:none}\
.tr-text{fill:#1d232a;font:12px system-ui,sans-serif}\
.tr-axis{stroke:#57606a;stroke-width:1}\
.tr-grid{stroke:#d0d7de;stroke-width:1}\
.tr-ok{fill:#1a7f37}\
.tr-bad{stroke:#cf222e;stroke-width:1.5}.tr-hatch{fill:#cf222e}\
.tr-rate{fill:#0969da}\
@media (prefers-color-scheme: dark){\
.tr-text{fill:#e6edf3}\
.tr-axis{stroke:#8b949e}\
.tr-grid{stroke:#30363d}\
.tr-ok{fill:#3fb950}\
.tr-bad{stroke:#ff7b72}.tr-hatch{fill:#ff7b72}\
.tr-rate{fill:#58a6ff}\
}</style>";

/// Seconds as people read them: `0.42s`, `12s`, `3m05s`.
pub(crate) fn secs(ns: i64) -> String {
    let s = ns.max(0) as f64 / 1e9;
    if s < 10.0 {
        format!("{s:.2}s")
    } else if s < 60.0 {
        format!("{s:.0}s")
    } else {
        let whole = s.round() as i64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}

/// A number as SVG coordinates take it (at most two decimals, no trailing zeros).
fn num(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    }
}

/// The opening of a chart: the root with its accessible name and description, the style, the
/// axes.
fn open(id: &str, title: &str, desc: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"trend\" id=\"{id}\" role=\"img\" \
         aria-labelledby=\"{id}-title {id}-desc\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\">\
         <title id=\"{id}-title\">{}</title><desc id=\"{id}-desc\">{}</desc>{STYLE}\
         <defs><pattern id=\"{id}-hatch\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
         patternTransform=\"rotate(45)\"><rect width=\"3\" height=\"6\" class=\"tr-hatch\"/></pattern></defs>\
         <line class=\"tr-axis\" x1=\"{LEFT}\" y1=\"{BOTTOM}\" x2=\"{RIGHT}\" y2=\"{BOTTOM}\"/>\
         <line class=\"tr-axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{BOTTOM}\"/>",
        esc(title),
        esc(desc)
    );
    s
}

/// A chart with nothing to draw: the frame and a line saying so.
fn empty(id: &str, title: &str) -> String {
    let mut s = open(id, title, "No builds yet.");
    let _ = write!(
        s,
        "<text class=\"tr-text\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">No builds yet.</text></svg>",
        num((LEFT + RIGHT) / 2.0),
        num((TOP + BOTTOM) / 2.0)
    );
    s
}

/// The x of slot `i` of `n` across the plot, and the bar's width (70 % of the slot, at most
/// 40 px).
fn slot(i: usize, n: usize) -> (f64, f64) {
    let step = (RIGHT - LEFT) / n as f64;
    let w = (step * 0.7).min(40.0);
    (LEFT + step * i as f64 + (step - w) / 2.0, w)
}

/// The duration of each build in `builds` (oldest first): one bar each, its height to scale
/// with the longest (the top of the axis, labelled), green for a success, red and hatched for
/// a failure.
pub(crate) fn duration_chart(project: &str, builds: &[Build]) -> String {
    let id = "trend-duration";
    let title = format!("Build durations of {project}");
    if builds.is_empty() {
        return empty(id, &title);
    }
    let max = builds
        .iter()
        .map(|b| b.duration_ns.max(0))
        .max()
        .unwrap_or(0);
    let failed = builds.iter().filter(|b| !b.ok).count();
    let desc = format!(
        "The last {} builds, oldest first: longest {}, last {}; {} failed.",
        builds.len(),
        secs(max),
        secs(builds[builds.len() - 1].duration_ns),
        failed
    );
    let mut s = open(id, &title, &desc);
    let _ = write!(
        s,
        "<line class=\"tr-grid\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{RIGHT}\" y2=\"{TOP}\"/>\
         <text class=\"tr-text\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
         <text class=\"tr-text\" x=\"{}\" y=\"{}\" text-anchor=\"end\">0s</text>",
        num(LEFT - 6.0),
        num(TOP + 4.0),
        secs(max),
        num(LEFT - 6.0),
        num(BOTTOM + 4.0),
    );
    for (i, b) in builds.iter().enumerate() {
        let (x, w) = slot(i, builds.len());
        let h = if max == 0 {
            0.0
        } else {
            (BOTTOM - TOP) * b.duration_ns.max(0) as f64 / max as f64
        };
        let (class, fill) = if b.ok {
            ("tr-ok", String::new())
        } else {
            ("tr-bad", format!(" fill=\"url(#{id}-hatch)\""))
        };
        let _ = write!(
            s,
            "<rect class=\"bar {class}\"{fill} x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\">\
             <title>{} {}: {}, {}</title></rect>",
            num(x),
            num(BOTTOM - h),
            num(w),
            num(h),
            esc(&b.id[..b.id.len().min(12)]),
            esc(&b.started_at),
            secs(b.duration_ns),
            if b.ok { "success" } else { "failed" }
        );
    }
    let _ = write!(
        s,
        "<text class=\"tr-text\" x=\"{LEFT}\" y=\"{}\">oldest</text>\
         <text class=\"tr-text\" x=\"{RIGHT}\" y=\"{}\" text-anchor=\"end\">newest</text></svg>",
        num(BOTTOM + 20.0),
        num(BOTTOM + 20.0)
    );
    s
}

/// The success rate of `builds` (oldest first) in groups of `per_bucket` consecutive builds
/// (the last group may be smaller): one bar each, its height the rate, labelled in percent.
pub(crate) fn success_chart(project: &str, builds: &[Build], per_bucket: usize) -> String {
    let id = "trend-success";
    let title = format!("Success rate of {project}");
    let per_bucket = per_bucket.max(1);
    if builds.is_empty() {
        return empty(id, &title);
    }
    let buckets: Vec<(usize, usize)> = builds
        .chunks(per_bucket)
        .map(|c| (c.iter().filter(|b| b.ok).count(), c.len()))
        .collect();
    let ok: usize = buckets.iter().map(|b| b.0).sum();
    let desc = format!(
        "The last {} builds in groups of {per_bucket}, oldest first: {} of {} succeeded ({}%).",
        builds.len(),
        ok,
        builds.len(),
        ok * 100 / builds.len()
    );
    let mut s = open(id, &title, &desc);
    let _ = write!(
        s,
        "<line class=\"tr-grid\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{RIGHT}\" y2=\"{TOP}\"/>\
         <text class=\"tr-text\" x=\"{}\" y=\"{}\" text-anchor=\"end\">100%</text>\
         <text class=\"tr-text\" x=\"{}\" y=\"{}\" text-anchor=\"end\">0%</text>",
        num(LEFT - 6.0),
        num(TOP + 4.0),
        num(LEFT - 6.0),
        num(BOTTOM + 4.0),
    );
    for (i, (good, n)) in buckets.iter().enumerate() {
        let (x, w) = slot(i, buckets.len());
        let h = (BOTTOM - TOP) * *good as f64 / *n as f64;
        let pct = good * 100 / n;
        let _ = write!(
            s,
            "<rect class=\"bar tr-rate\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\">\
             <title>builds {}–{}: {good} of {n} succeeded</title></rect>\
             <text class=\"tr-text rate\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">{pct}%</text>",
            num(x),
            num(BOTTOM - h),
            num(w),
            num(h),
            i * per_bucket + 1,
            i * per_bucket + n,
            num(x + w / 2.0),
            num((BOTTOM - h - 4.0).max(TOP + 12.0)),
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, secs: i64, ok: bool) -> Build {
        Build {
            id: id.to_string(),
            started_at: "2026-01-01T00:00:00Z".to_string(),
            duration_ns: secs * 1_000_000_000,
            ok,
        }
    }

    fn count(s: &str, what: &str) -> usize {
        s.matches(what).count()
    }

    /// The attributes of the `n`th bar (x, y, width, height).
    fn bar(s: &str, n: usize) -> (String, String, String, String) {
        let start = s.match_indices("<rect class=\"bar").nth(n).unwrap().0;
        let tag = &s[start..start + s[start..].find('>').unwrap()];
        let attr = |name: &str| {
            let at = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            tag[at..at + tag[at..].find('"').unwrap()].to_string()
        };
        (attr("x"), attr("y"), attr("width"), attr("height"))
    }

    #[test]
    fn durations_to_scale() {
        let s = duration_chart(
            "app",
            &[
                b("a", 10, true),
                b("b", 20, false),
                b("c", 5, true),
                b("d", 40, true),
            ],
        );
        assert_eq!(count(&s, "<rect class=\"bar"), 4);
        assert_eq!(count(&s, "<rect class=\"bar tr-ok\""), 3);
        assert_eq!(
            count(
                &s,
                "<rect class=\"bar tr-bad\" fill=\"url(#trend-duration-hatch)\""
            ),
            1
        );
        // 4 slots of 144 px from x=56: bars 40 px wide (70 % is 100.8, capped), centred.
        // Heights out of 170 px, to scale with the longest (40s).
        assert_eq!(
            bar(&s, 0),
            ("108".into(), "143.5".into(), "40".into(), "42.5".into())
        );
        assert_eq!(
            bar(&s, 1),
            ("252".into(), "101".into(), "40".into(), "85".into())
        );
        assert_eq!(
            bar(&s, 3),
            ("540".into(), "16".into(), "40".into(), "170".into())
        );
        assert!(s.contains(">40s</text>"), "{s}");
        assert!(
            s.contains("<title>b 2026-01-01T00:00:00Z: 20s, failed</title>"),
            "{s}"
        );
        assert!(s.contains("<title id=\"trend-duration-title\">Build durations of app</title>"));
        assert!(s.contains(
            "<desc id=\"trend-duration-desc\">The last 4 builds, oldest first: longest 40s, last 40s; 1 failed.</desc>"
        ));
        assert!(s.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"trend\" id=\"trend-duration\" role=\"img\""));
        assert!(s.contains("@media (prefers-color-scheme: dark)"));
        assert!(s.ends_with("</svg>"));
    }

    #[test]
    fn rates_per_bucket() {
        let builds: Vec<Build> = (0..7).map(|i| b(&format!("j{i}"), 1, i % 3 != 0)).collect();
        // Buckets [0..3): j0 failed, 2 of 3; [3..6): j3 failed, 2 of 3; [6]: j6 failed, 0 of 1.
        let s = success_chart("app", &builds, 3);
        assert_eq!(count(&s, "<rect class=\"bar tr-rate\""), 3);
        assert_eq!(count(&s, "<text class=\"tr-text rate\""), 3);
        // 3 slots of 192 px: bars 40 px wide; 2/3 of 170 px is 113.33.
        assert_eq!(
            bar(&s, 0),
            ("132".into(), "72.67".into(), "40".into(), "113.33".into())
        );
        assert_eq!(
            bar(&s, 2),
            ("516".into(), "186".into(), "40".into(), "0".into())
        );
        assert!(
            s.contains("<title>builds 1–3: 2 of 3 succeeded</title>"),
            "{s}"
        );
        assert!(
            s.contains("<title>builds 7–7: 0 of 1 succeeded</title>"),
            "{s}"
        );
        assert!(s.contains(">66%</text>") && s.contains(">0%</text>"), "{s}");
        assert!(s.contains("4 of 7 succeeded (57%)."), "{s}");
    }

    #[test]
    fn nothing_one_and_all_failed() {
        for s in [duration_chart("app", &[]), success_chart("app", &[], 5)] {
            assert_eq!(count(&s, "<rect class=\"bar"), 0);
            assert!(s.contains(">No builds yet.</text>"), "{s}");
            assert!(s.contains("role=\"img\""));
        }
        let s = duration_chart("app", &[b("a", 3, true)]);
        assert_eq!(count(&s, "<rect class=\"bar"), 1);
        // One slot of 576 px: a 40 px bar in its middle, the whole height.
        assert_eq!(
            bar(&s, 0),
            ("324".into(), "16".into(), "40".into(), "170".into())
        );
        let failed = vec![b("a", 0, false), b("b", 0, false)];
        let s = duration_chart("app", &failed);
        assert_eq!(count(&s, "<rect class=\"bar tr-bad\""), 2);
        assert_eq!(bar(&s, 1).3, "0");
        let s = success_chart("app", &failed, 5);
        assert_eq!(count(&s, "<rect class=\"bar tr-rate\""), 1);
        assert_eq!(bar(&s, 0).3, "0");
        assert!(s.contains("0 of 2 succeeded (0%)."), "{s}");
    }

    #[test]
    fn names_are_escaped() {
        let evil = "<script>alert('x')</script>&\"";
        for s in [
            duration_chart(evil, &[b(evil, 1, true)]),
            success_chart(evil, &[], 5),
        ] {
            assert!(!s.contains("<script"), "{s}");
            assert!(
                s.contains("of &lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;</title>"),
                "{s}"
            );
        }
    }

    #[test]
    fn durations_read() {
        assert_eq!(secs(420_000_000), "0.42s");
        assert_eq!(secs(12_400_000_000), "12s");
        assert_eq!(secs(185_000_000_000), "3m05s");
        assert_eq!(secs(-1_000_000_000), "0.00s");
        assert_eq!(num(72.666_666), "72.67");
        assert_eq!(num(40.0), "40");
        assert_eq!(num(143.5), "143.5");
    }
}
