//! The dashboard's files, embedded in the binary: the pages and the script and style sheet
//! in controller/server/web/, and uPlot (the charting library of the training curves, from
//! npm at build time: controller/server/build.rs copies it out of web/node_modules).

/// The dashboard page (needs a session).
pub const INDEX_HTML: &str = include_str!("../../web/index.html");
/// The login page.
pub const LOGIN_HTML: &str = include_str!("../../web/login.html");

/// The static files under `/assets/`: name, content type, contents.
const FILES: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/app.js"),
    ),
    (
        "login.js",
        "text/javascript; charset=utf-8",
        include_str!("../../web/login.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../../web/app.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("../../web/favicon.svg"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!(concat!(env!("OUT_DIR"), "/uPlot.iife.min.js")),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!(concat!(env!("OUT_DIR"), "/uPlot.min.css")),
    ),
];

/// The content type and contents of asset `name`.
pub fn find(name: &str) -> Option<(&'static str, &'static str)> {
    FILES
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, t, body)| (*t, *body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_file_the_pages_load_is_embedded() {
        for page in [INDEX_HTML, LOGIN_HTML] {
            for part in page.split("/assets/").skip(1) {
                let name = part.split('"').next().unwrap_or_default();
                assert!(find(name).is_some(), "{name} is loaded but not embedded");
            }
        }
        let (_, uplot) = find("uPlot.iife.min.js").unwrap();
        assert!(uplot.contains("uPlot"), "uPlot is the npm package's");
        assert!(find("../Cargo.toml").is_none());
    }
}
