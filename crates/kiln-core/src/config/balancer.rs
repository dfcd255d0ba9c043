//! `balancer` blocks: listeners of kiln's proxy and their routes.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hcl::Value;
use hcl_edit::structure::Block;

use super::body::Schema;
use super::eval::At;
use super::{Decls, Loader, Ref, header, span};
use crate::model::{Balancer, Route};

const BALANCER: Schema = Schema {
    what: "balancer block",
    attrs: &["listen"],
    blocks: &["route"],
};

const ROUTE: Schema = Schema {
    what: "route block",
    attrs: &["path_prefix", "host", "service"],
    blocks: &[],
};

impl Loader<'_> {
    pub(super) fn balancers(&mut self, decls: &Decls<'_>) -> BTreeMap<String, Balancer> {
        let mut listeners: BTreeMap<SocketAddr, String> = BTreeMap::new();
        let mut balancers = BTreeMap::new();
        for (name, block) in decls {
            let fields = self.fields(&block.body, header(block), &BALANCER);
            let listen_attr = self.required(&fields, "listen");
            let listen = self.get(listen_attr, Self::socket_addr);
            if let (Some(addr), Some(attr)) = (listen, listen_attr) {
                // Two listeners on one address cannot both bind; catch it before deploy does.
                if let Some(first) = listeners.get(&addr) {
                    let msg = format!("balancer `{first}` already listens on {addr}");
                    self.error(span(&attr.value), msg);
                } else {
                    listeners.insert(addr, name.clone());
                }
            }
            let routes: Vec<Route> = fields
                .blocks("route")
                .filter_map(|b| self.route(b))
                .collect();
            if fields.blocks("route").next().is_none() {
                let msg = "balancer needs at least one `route` block";
                self.error(fields.header.clone(), msg);
            }
            let balancer = Balancer {
                name: name.clone(),
                listen: listen.map(|a| a.to_string()).unwrap_or_default(),
                routes,
                loc: self.loc(span(&block.ident).start),
            };
            balancers.insert(name.clone(), balancer);
        }
        balancers
    }

    fn socket_addr(&mut self, value: &Value, at: &At<'_>) -> Option<SocketAddr> {
        let addr = match value {
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        if addr.is_none() {
            self.mismatch(at, "an address such as \"127.0.0.1:8080\"", value);
        }
        addr
    }

    fn route(&mut self, block: &Block) -> Option<Route> {
        for label in &block.labels {
            self.error(span(label), "`route` block takes no labels");
        }
        let fields = self.fields(&block.body, header(block), &ROUTE);
        let path_prefix = self.get(fields.attr("path_prefix"), Self::url_path);
        let host = self.get(fields.attr("host"), Self::string);
        let service = self.required(&fields, "service");
        let service = self.get(service, |cx, v, at| cx.reference(Ref::Service, v, at))?;
        Some(Route {
            host,
            path_prefix: path_prefix.unwrap_or_else(|| "/".into()),
            service,
        })
    }
}
