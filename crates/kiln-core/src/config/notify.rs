//! `notify` blocks: webhooks that receive rollout events, at the top level (every service) and
//! inside a `service` block (that service). A body may hold several.

use hcl::Value;
use hcl_edit::structure::Block;

use super::body::{Fields, Schema};
use super::eval::At;
use super::{Loader, header, span};
use crate::diag::Severity;
use crate::model::Notify;

const NOTIFY: Schema = Schema {
    what: "notify block",
    attrs: &["webhook"],
    blocks: &[],
};

impl Loader<'_> {
    /// Every `notify` block of `fields`, in source order.
    pub(super) fn notify_blocks(&mut self, fields: &Fields<'_>) -> Vec<Notify> {
        let blocks: Vec<&Block> = fields.blocks("notify").collect();
        blocks
            .into_iter()
            .filter_map(|block| self.notify(block))
            .collect()
    }

    fn notify(&mut self, block: &Block) -> Option<Notify> {
        for label in &block.labels {
            self.error(span(label), "`notify` block takes no labels");
        }
        let f = self.fields(&block.body, header(block), &NOTIFY);
        let webhook = self.required(&f, "webhook");
        let webhook = self.get(webhook, Self::webhook_url)?;
        Some(Notify { webhook })
    }

    /// An `http://host[:port][/path]` URL.
    fn webhook_url(&mut self, value: &Value, at: &At<'_>) -> Option<String> {
        let url = self.string(value, at)?;
        match check_webhook(&url) {
            Ok(()) => Some(url),
            Err(problem) => {
                let help = problem.help.map(str::to_owned);
                self.report(Severity::Error, at.span.clone(), problem.message, help);
                None
            }
        }
    }
}

/// Why a webhook URL is refused.
#[derive(Debug)]
struct Problem {
    message: String,
    help: Option<&'static str>,
}

/// Checks that `url` is an `http://` URL with a host and, if given, a valid port.
fn check_webhook(url: &str) -> Result<(), Problem> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Err(Problem {
            message: format!("webhook `{url}`: https is not supported yet"),
            help: Some(
                "kiln has no TLS client yet; use an http:// URL, for example a relay on localhost",
            ),
        });
    }
    let Some(rest) = lower.strip_prefix("http://") else {
        return Err(Problem {
            message: format!("webhook `{url}` is not an http:// URL"),
            help: Some("write it as \"http://host:port/path\""),
        });
    };
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Problem {
            message: format!("webhook `{url}` contains whitespace"),
            help: None,
        });
    }
    let authority = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or_default()
        .rsplit('@')
        .next()
        .unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        // `[::1]:80` and `host:80`; a bare `[::1]` has its colons inside the brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (authority, None),
    };
    if host.is_empty() || host == "[]" {
        return Err(Problem {
            message: format!("webhook `{url}` has no host"),
            help: Some("write it as \"http://host:port/path\""),
        });
    }
    if let Some(port) = port
        && !matches!(port.parse::<u16>(), Ok(p) if p != 0)
    {
        return Err(Problem {
            message: format!("webhook `{url}` has a bad port `{port}`"),
            help: Some("a port is a number from 1 to 65535"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_webhook;

    #[test]
    fn accepts_http_urls() {
        for url in [
            "http://127.0.0.1:9000/hook",
            "http://hooks.example.com/kiln?token=abc",
            "http://localhost",
            "HTTP://LOCALHOST:80/",
            "http://[::1]:8080/x",
            "http://[::1]/x",
        ] {
            assert!(check_webhook(url).is_ok(), "{url}");
        }
    }

    #[test]
    fn refuses_others() {
        for (url, says) in [
            ("https://hooks.example.com/x", "https is not supported yet"),
            ("ftp://example.com", "not an http:// URL"),
            ("example.com/hook", "not an http:// URL"),
            ("http://", "no host"),
            ("http:///path", "no host"),
            ("http://host:99999/", "bad port"),
            ("http://host:0/", "bad port"),
            ("http://host:abc/", "bad port"),
            ("http://ho st/", "whitespace"),
        ] {
            let err = check_webhook(url).expect_err(url);
            assert!(err.message.contains(says), "{url}: {}", err.message);
        }
    }
}
