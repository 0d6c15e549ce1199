//! Draw a layer stack as an SVG picture: one bar per layer, the top layer on top, its length
//! by size (log scale, so a 1 KiB layer still shows beside a 200 MiB base) and split in
//! colours by the share of adds, changes and deletes.

use std::fmt::Write;

use super::layers::LayerMap;

const W: f64 = 900.0;
const ROW: f64 = 46.0;
const BAR_X: f64 = 250.0;
const BAR_MAX: f64 = 400.0;
const ADD: &str = "#3a9d5d";
const CHANGE: &str = "#e0a526";
const DELETE: &str = "#d64545";
const EMPTY: &str = "#b8b8b8";

/// Escape text for XML.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c if (c as u32) < 0x20 => o.push('?'),
            c => o.push(c),
        }
    }
    o
}

pub fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// The picture of `layers` (top first), titled `title`.
pub fn render(title: &str, layers: &[LayerMap]) -> String {
    let h = 70.0 + ROW * layers.len() as f64 + 40.0;
    let max = layers.iter().map(|l| l.size_bytes).max().unwrap_or(0);
    let scale = |b: u64| {
        let f = if max == 0 {
            0.0
        } else {
            (1.0 + b as f64).ln() / (1.0 + max as f64).ln()
        };
        8.0 + (BAR_MAX - 8.0) * f
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="20" y="30" font-size="17" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="20" y="50" fill="#555">top layer first; bar length: size (log scale); colours: share of adds, changes, deletes</text>"##
    );
    for (i, l) in layers.iter().enumerate() {
        let y = 70.0 + ROW * i as f64;
        let name = l.store.as_deref().map_or(String::new(), |d| {
            let short = d.strip_prefix("sha256:").map_or(d.to_string(), |h| {
                format!("sha256:{}", &h[..h.len().min(12)])
            });
            format!(" {short}")
        });
        let _ = writeln!(
            s,
            r#"<g class="layer" data-label="{}" data-adds="{}" data-changes="{}" data-deletes="{}" data-size="{}" data-hides="{}">"#,
            esc(&l.label),
            l.adds,
            l.changes,
            l.deletes,
            l.size_bytes,
            l.hides_bytes
        );
        let _ = writeln!(
            s,
            r##"<text x="20" y="{:.1}">{}</text><text x="20" y="{:.1}" fill="#777" font-size="11">{}</text>"##,
            y + 15.0,
            esc(&l.label),
            y + 30.0,
            esc(name.trim())
        );
        let len = scale(l.size_bytes);
        let total = (l.adds + l.changes + l.deletes) as f64;
        let mut x = BAR_X;
        if total == 0.0 {
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{len:.1}" height="26" fill="{EMPTY}"/>"#,
                y + 6.0
            );
        } else {
            for (n, colour, what) in [
                (l.adds, ADD, "adds"),
                (l.changes, CHANGE, "changes"),
                (l.deletes, DELETE, "deletes"),
            ] {
                if n == 0 {
                    continue;
                }
                let w = len * n as f64 / total;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x:.1}" y="{:.1}" width="{w:.1}" height="26" fill="{colour}"><title>{n} {what}</title></rect>"#,
                    y + 6.0
                );
                x += w;
            }
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}">{} · +{} ~{} −{}{}</text>"#,
            BAR_X + BAR_MAX + 12.0,
            y + 24.0,
            human(l.size_bytes),
            l.adds,
            l.changes,
            l.deletes,
            if l.hides_bytes > 0 {
                format!(" · hides {}", human(l.hides_bytes))
            } else {
                String::new()
            }
        );
        let _ = writeln!(s, "</g>");
    }
    let ly = h - 25.0;
    for (i, (colour, what)) in [(ADD, "adds"), (CHANGE, "changes"), (DELETE, "deletes")]
        .iter()
        .enumerate()
    {
        let x = 20.0 + 110.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="{:.1}" width="14" height="14" fill="{colour}"/><text x="{}" y="{:.1}">{what}</text>"#,
            ly - 11.0,
            x + 20.0,
            ly
        );
    }
    s.push_str("</svg>\n");
    s
}
