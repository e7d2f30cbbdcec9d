//! Network commands and flags: `-p [HOST_PORT:]GUEST_PORT` as docker takes it, `hearth port`,
//! `hearth network`.

use crate::{output, Ctx};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use hearth_api::{Egress, NetworkRequest, PublishPortRequest, PublishedPort};

/// The network flags of create, restore and fork.
#[derive(Args, Default)]
pub struct NetworkArgs {
    /// Publish a guest port on the host: `[HOST_PORT:]GUEST_PORT` (host side first, as docker
    /// takes it); repeatable. Without a host port, one is chosen.
    #[arg(short = 'p', long = "publish", value_name = "[HOST_PORT:]GUEST_PORT")]
    pub publish: Vec<String>,
    /// Whether the guest may open connections out of its machine (`allow` or `deny`).
    #[arg(long, value_parser = parse_egress)]
    pub egress: Option<Egress>,
}

impl NetworkArgs {
    /// The request's `network`, with `--no-network` for a create.
    pub fn request(&self, no_network: bool) -> Option<NetworkRequest> {
        (no_network || self.egress.is_some()).then(|| NetworkRequest {
            enabled: no_network.then_some(false),
            egress: self.egress,
            ..Default::default()
        })
    }

    /// The request's `ports`, named `p<guest port>` (and `-<host port>` where given).
    pub fn ports(&self) -> Result<Option<Vec<PublishPortRequest>>> {
        if self.publish.is_empty() {
            return Ok(None);
        }
        self.publish
            .iter()
            .map(|p| parse_publish(p, None))
            .collect::<Result<_>>()
            .map(Some)
    }
}

pub fn parse_egress(s: &str) -> Result<Egress, String> {
    match s {
        "allow" => Ok(Egress::Allow),
        "deny" => Ok(Egress::Deny),
        other => Err(format!("{other:?}: allow or deny")),
    }
}

/// `[HOST_PORT:]GUEST_PORT[/tcp]`.
fn parse_publish(spec: &str, id: Option<&str>) -> Result<PublishPortRequest> {
    let (ports, protocol) = match spec.split_once('/') {
        Some((p, proto)) => (p, Some(proto.to_string())),
        None => (spec, None),
    };
    let num = |s: &str| -> Result<u32> {
        s.parse()
            .with_context(|| format!("-p {spec}: {s:?} is not a port number"))
    };
    let (host_port, port) = match ports.split_once(':') {
        Some((h, g)) => (Some(num(h)?), num(g)?),
        None => (None, num(ports)?),
    };
    let id = match (id, host_port) {
        (Some(id), _) => id.to_string(),
        (None, Some(h)) => format!("p{port}-{h}"),
        (None, None) => format!("p{port}"),
    };
    Ok(PublishPortRequest {
        published_port_id: id,
        name: None,
        port,
        protocol,
        host_port,
    })
}

#[derive(Subcommand)]
pub enum PortCmd {
    /// Publish a guest port: `hearth port add NAME [HOST_PORT:]GUEST_PORT`.
    Add {
        name: String,
        #[arg(value_name = "[HOST_PORT:]GUEST_PORT")]
        port: String,
        /// The port's id (default: p<guest port>).
        #[arg(long)]
        id: Option<String>,
    },
    /// List a machine's published ports.
    Ls { name: String },
    /// Remove a published port by id.
    Rm { name: String, id: String },
}

#[derive(Subcommand)]
pub enum NetworkCmd {
    /// Change a machine's egress policy; on a running machine it takes effect at once.
    Set {
        name: String,
        #[arg(long, value_parser = parse_egress)]
        egress: Option<Egress>,
        /// Destinations allowed even under `--egress deny` (CIDR; repeatable; replaces the list).
        #[arg(long = "allow")]
        allow: Vec<String>,
        /// Destinations refused even under `--egress allow` (CIDR; repeatable; replaces the list).
        #[arg(long = "deny")]
        deny: Vec<String>,
    },
}

pub async fn port(ctx: &Ctx, cmd: PortCmd) -> Result<()> {
    match cmd {
        PortCmd::Add { name, port, id } => {
            let req = parse_publish(&port, id.as_deref())?;
            let p = ctx.client.publish_port(&name, &req).await?;
            if ctx.json {
                output::print_json(&p);
            } else {
                println!(
                    "{}: guest port {} is on host port {}",
                    p.id, p.port, p.host_port
                );
            }
        }
        PortCmd::Ls { name } => {
            let ports = ctx.client.list_ports(&name).await?;
            if ctx.json {
                output::print_json(&ports);
            } else {
                print_ports(&ports);
            }
        }
        PortCmd::Rm { name, id } => ctx.client.unpublish_port(&name, &id).await?,
    }
    Ok(())
}

pub fn print_ports(ports: &[PublishedPort]) {
    let rows: Vec<Vec<String>> = ports
        .iter()
        .map(|p| {
            vec![
                p.id.clone(),
                p.port.to_string(),
                p.host_port.to_string(),
                p.protocol.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "GUEST PORT", "HOST PORT", "PROTOCOL"], &rows);
}

pub async fn network(ctx: &Ctx, cmd: NetworkCmd) -> Result<()> {
    let NetworkCmd::Set {
        name,
        egress,
        allow,
        deny,
    } = cmd;
    if egress.is_none() && allow.is_empty() && deny.is_empty() {
        bail!("nothing to change: give --egress, --allow or --deny");
    }
    let req = NetworkRequest {
        enabled: None,
        egress,
        allow_cidrs: (!allow.is_empty()).then_some(allow),
        deny_cidrs: (!deny.is_empty()).then_some(deny),
    };
    let m = ctx.client.set_network(&name, &req).await?;
    if ctx.json {
        output::print_json(&m);
    } else {
        output::machine(&m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_flags_read_as_docker_writes_them() {
        let p = parse_publish("8080", None).unwrap();
        assert_eq!((p.port, p.host_port), (8080, None));
        assert_eq!(p.published_port_id, "p8080");
        let p = parse_publish("20080:80/tcp", None).unwrap();
        assert_eq!((p.port, p.host_port), (80, Some(20080)));
        assert_eq!(p.protocol.as_deref(), Some("tcp"));
        assert_eq!(p.published_port_id, "p80-20080");
        assert!(parse_publish("http", None).is_err());
        assert!(parse_publish("1:2:3", None).is_err());
    }
}
