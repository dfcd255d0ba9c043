//! Route matching: which service serves a request, from its host and path. Pure.

use crate::model::RouteTarget;

/// A balancer's routes, sorted in the order they are tried.
#[derive(Debug, Default)]
pub(crate) struct Routes {
    entries: Vec<RouteTarget>,
}

impl Routes {
    /// Sorts routes so that the first match is the right one: host-specific routes before
    /// host-less ones, then longer prefixes before shorter. The sort is stable, so among equal
    /// routes the caller's order decides.
    pub(crate) fn new(mut routes: Vec<RouteTarget>) -> Self {
        for r in &mut routes {
            if let Some(h) = &mut r.host {
                h.make_ascii_lowercase();
            }
        }
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        Self { entries: routes }
    }

    /// The service for a request to `host` (a `Host` header value, port allowed) and `path`.
    pub(crate) fn find(&self, host: Option<&str>, path: &str) -> Option<&str> {
        let host = host.map(strip_port);
        self.entries
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(want), Some(got)) => want.eq_ignore_ascii_case(got),
                    (Some(_), None) => false,
                };
                host_ok && path.starts_with(r.path_prefix.as_str())
            })
            .map(|r| r.service.as_str())
    }

    pub(crate) fn targets(&self) -> &[RouteTarget] {
        &self.entries
    }
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn strip_port(host: &str) -> &str {
    match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(host: Option<&str>, prefix: &str, service: &str) -> RouteTarget {
        RouteTarget {
            host: host.map(str::to_owned),
            path_prefix: prefix.to_owned(),
            service: service.to_owned(),
        }
    }

    #[test]
    fn host_routes_first_then_longest_prefix() {
        let routes = Routes::new(vec![
            route(None, "/", "web"),
            route(None, "/api/", "api"),
            route(Some("Admin.example.com"), "/", "admin"),
            route(None, "/api/v2/", "api2"),
        ]);
        let f = |h, p| routes.find(h, p);
        assert_eq!(f(Some("example.com"), "/x"), Some("web"));
        assert_eq!(f(Some("example.com"), "/api/x"), Some("api"));
        assert_eq!(f(None, "/api/v2/x"), Some("api2"));
        assert_eq!(f(Some("admin.example.com:8080"), "/api/x"), Some("admin"));
        assert_eq!(f(Some("[::1]:80"), "/"), Some("web"));
        assert_eq!(
            Routes::new(vec![route(None, "/api", "api")]).find(None, "/"),
            None
        );
    }
}
