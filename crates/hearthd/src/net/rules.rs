//! nftables rules, built with the `nftables` crate and applied atomically by `nft -j -f -`
//! (a whole table at a time, inside a machine's namespace where it belongs there).
//!
//! On the host, table `inet hearth-<tag>` only restricts (its chains accept by default, so it never
//! breaks the host's own traffic): machines' veths (`h<tag>…`) reach nothing on the host but
//! replies, nothing in the pool (other machines), and nothing but the egress interface, where
//! their traffic is masqueraded. In each machine's namespace, table `inet hearth` maps the
//! guest to the namespace's address (SNAT out, DNAT in), drops everything the guest sends to
//! the namespace itself and to link-local addresses (metadata services), and applies the
//! machine's egress policy to new connections the guest opens; replies to connections made to
//! the guest (published ports) pass whatever the policy.

use crate::error::{Error, Result};
use ipnet::Ipv4Net;
use nftables::batch::Batch;
use nftables::expr::{Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix};
use nftables::schema::{Chain, NfListObject, Nftables, Rule, Table};
use nftables::stmt::{Match, Operator, Statement, NAT};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use std::borrow::Cow;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// A machine namespace's table.
pub const TABLE: &str = "hearth";

/// The host's table of the daemon tagged `tag`: daemons sharing a host keep out of each
/// other's rules.
pub fn host_table_name(tag: &str) -> String {
    format!("hearth-{tag}")
}
/// Link-local addresses, where cloud metadata services live; the guest's own link is in it too.
const LINK_LOCAL: &str = "169.254.0.0/16";

/// What a machine's guest may open connections to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    pub allow: bool,
    pub allow_cidrs: Vec<Ipv4Net>,
    pub deny_cidrs: Vec<Ipv4Net>,
}

fn s(v: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(v.to_string()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ip(field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: "ip".into(),
            field: field.into(),
        },
    )))
}

fn prefix(net: Ipv4Net) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(&net.network().to_string())),
        len: net.prefix_len() as u32,
    }))
}

fn is(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn ct_state(states: &[&str]) -> Statement<'static> {
    Statement::Match(Match {
        left: Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "state".into(),
            family: None,
            dir: None,
        })),
        right: Expression::List(states.iter().map(|v| s(v)).collect()),
        op: Operator::IN,
    })
}

const REPLIES: &[&str] = &["established", "related"];

fn isnt(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::NEQ,
    })
}

/// Packets that answer a connection opened from the other side (not more packets of one the
/// sender opened, which its policy must still see).
fn reply_direction() -> Statement<'static> {
    is(
        Expression::Named(NamedExpression::CT(nftables::expr::CT {
            key: "direction".into(),
            family: None,
            dir: None,
        })),
        s("reply"),
    )
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn drop() -> Statement<'static> {
    Statement::Drop(None)
}

fn nat_to(addr: Ipv4Addr) -> Option<NAT<'static>> {
    Some(NAT {
        addr: Some(s(&addr.to_string())),
        family: Some(nftables::stmt::NATFamily::IP),
        port: None,
        flags: None,
    })
}

/// A table being written: every chain and rule goes into one batch.
struct TableBuilder {
    name: String,
    batch: Batch<'static>,
}

impl TableBuilder {
    /// Replaces table `TABLE` whole, in one transaction (add, delete, add: no error if absent).
    fn replace(name: &str) -> TableBuilder {
        let mut batch = Batch::new();
        let table = || {
            NfListObject::Table(Table {
                family: NfFamily::INet,
                name: Cow::Owned(name.to_string()),
                handle: None,
            })
        };
        batch.add(table());
        batch.delete(table());
        batch.add(table());
        TableBuilder {
            name: name.to_string(),
            batch,
        }
    }

    fn chain(
        &mut self,
        name: &'static str,
        hook: Option<(NfChainType, NfHook, i32)>,
        policy: NfChainPolicy,
    ) {
        let mut chain = Chain {
            family: NfFamily::INet,
            table: Cow::Owned(self.name.clone()),
            name: name.into(),
            ..Chain::default()
        };
        if let Some((kind, hook, prio)) = hook {
            chain._type = Some(kind);
            chain.hook = Some(hook);
            chain.prio = Some(prio);
            chain.policy = Some(policy);
        }
        self.batch.add(NfListObject::Chain(chain));
    }

    fn rule(&mut self, chain: &'static str, stmts: Vec<Statement<'static>>) {
        self.batch.add(NfListObject::Rule(Rule {
            family: NfFamily::INet,
            table: Cow::Owned(self.name.clone()),
            chain: chain.into(),
            expr: Cow::Owned(stmts),
            ..Rule::default()
        }));
    }

    fn build(self) -> Nftables<'static> {
        self.batch.to_nftables()
    }
}

const FILTER: i32 = 0;
const DSTNAT: i32 = -100;
const SRCNAT: i32 = 100;

/// The host's table `name`. `veths` is the wildcard of machines' host-side veth names.
pub fn host_table(
    name: &str,
    veths: &str,
    pool: Ipv4Net,
    egress_interface: &str,
) -> Nftables<'static> {
    let mut t = TableBuilder::replace(name);
    let from_machine = || is(meta(MetaKey::Iifname), s(veths));
    let to_machine = || is(meta(MetaKey::Oifname), s(veths));
    t.chain(
        "input",
        Some((NfChainType::Filter, NfHook::Input, FILTER)),
        NfChainPolicy::Accept,
    );
    t.rule("input", vec![from_machine(), ct_state(REPLIES), accept()]);
    t.rule("input", vec![from_machine(), drop()]);
    t.chain(
        "forward",
        Some((NfChainType::Filter, NfHook::Forward, FILTER)),
        NfChainPolicy::Accept,
    );
    // A machine's traffic carries its own pool address and is IPv4; anything else is forged.
    t.rule(
        "forward",
        vec![
            from_machine(),
            is(meta(MetaKey::Nfproto), s("ipv6")),
            drop(),
        ],
    );
    t.rule(
        "forward",
        vec![from_machine(), isnt(ip("saddr"), prefix(pool)), drop()],
    );
    t.rule(
        "forward",
        vec![from_machine(), is(ip("daddr"), prefix(pool)), drop()],
    );
    t.rule("forward", vec![to_machine(), ct_state(REPLIES), accept()]);
    t.rule("forward", vec![to_machine(), drop()]);
    t.rule(
        "forward",
        vec![
            from_machine(),
            is(meta(MetaKey::Oifname), s(egress_interface)),
            accept(),
        ],
    );
    t.rule("forward", vec![from_machine(), drop()]);
    // The pool is only ever reached through a machine's veth: never by the default route
    // (a machine whose link is not made yet, a stale address).
    let off_veths = || {
        Statement::Match(Match {
            left: meta(MetaKey::Oifname),
            right: s(veths),
            op: Operator::NEQ,
        })
    };
    t.rule(
        "forward",
        vec![is(ip("daddr"), prefix(pool)), off_veths(), drop()],
    );
    t.chain(
        "output",
        Some((NfChainType::Filter, NfHook::Output, FILTER)),
        NfChainPolicy::Accept,
    );
    t.rule(
        "output",
        vec![is(ip("daddr"), prefix(pool)), off_veths(), drop()],
    );
    t.chain(
        "postrouting",
        Some((NfChainType::NAT, NfHook::Postrouting, SRCNAT)),
        NfChainPolicy::Accept,
    );
    t.rule(
        "postrouting",
        vec![
            is(meta(MetaKey::Oifname), s(egress_interface)),
            is(ip("saddr"), prefix(pool)),
            Statement::Masquerade(None),
        ],
    );
    t.build()
}

/// A machine namespace's table: `uplink` is the namespace's veth end, `tap` the guest's link.
pub fn machine_table(
    uplink: &str,
    tap: &str,
    ns_addr: Ipv4Addr,
    guest: Ipv4Addr,
    policy: &EgressPolicy,
) -> Nftables<'static> {
    let mut t = TableBuilder::replace(TABLE);
    t.chain(
        "prerouting",
        Some((NfChainType::NAT, NfHook::Prerouting, DSTNAT)),
        NfChainPolicy::Accept,
    );
    // Whatever reaches the namespace's address from the host is for the guest.
    t.rule(
        "prerouting",
        vec![
            is(meta(MetaKey::Iifname), s(uplink)),
            is(ip("daddr"), s(&ns_addr.to_string())),
            Statement::DNAT(nat_to(guest)),
        ],
    );
    t.chain(
        "postrouting",
        Some((NfChainType::NAT, NfHook::Postrouting, SRCNAT)),
        NfChainPolicy::Accept,
    );
    t.rule(
        "postrouting",
        vec![
            is(meta(MetaKey::Oifname), s(uplink)),
            is(ip("saddr"), s(&guest.to_string())),
            Statement::SNAT(nat_to(ns_addr)),
        ],
    );
    t.chain(
        "input",
        Some((NfChainType::Filter, NfHook::Input, FILTER)),
        NfChainPolicy::Accept,
    );
    t.rule("input", vec![is(meta(MetaKey::Iifname), s(tap)), drop()]);
    // The chain a rule jumps to must exist before the rule.
    t.chain("egress", None, NfChainPolicy::Accept);
    egress_rules(&mut t, policy);
    t.chain(
        "forward",
        Some((NfChainType::Filter, NfHook::Forward, FILTER)),
        NfChainPolicy::Drop,
    );
    // The guest speaks IPv4 from its own address only: no forged sources, no IPv6 out.
    t.rule(
        "forward",
        vec![
            is(meta(MetaKey::Iifname), s(tap)),
            is(meta(MetaKey::Nfproto), s("ipv6")),
            drop(),
        ],
    );
    t.rule(
        "forward",
        vec![
            is(meta(MetaKey::Iifname), s(tap)),
            isnt(ip("saddr"), s(&guest.to_string())),
            drop(),
        ],
    );
    // Replies pass; the guest's own connections meet the policy on every packet, so a policy
    // changed to deny cuts them too.
    t.rule(
        "forward",
        vec![ct_state(REPLIES), reply_direction(), accept()],
    );
    t.rule(
        "forward",
        vec![
            is(meta(MetaKey::Iifname), s(uplink)),
            is(meta(MetaKey::Oifname), s(tap)),
            accept(),
        ],
    );
    t.rule(
        "forward",
        vec![
            is(meta(MetaKey::Iifname), s(tap)),
            is(meta(MetaKey::Oifname), s(uplink)),
            Statement::Jump(nftables::stmt::JumpTarget {
                target: "egress".into(),
            }),
        ],
    );
    t.build()
}

fn egress_rules(t: &mut TableBuilder, policy: &EgressPolicy) {
    let link_local: Ipv4Net = LINK_LOCAL.parse().expect("a valid prefix");
    t.rule("egress", vec![is(ip("daddr"), prefix(link_local)), drop()]);
    for net in &policy.deny_cidrs {
        t.rule("egress", vec![is(ip("daddr"), prefix(*net)), drop()]);
    }
    for net in &policy.allow_cidrs {
        t.rule("egress", vec![is(ip("daddr"), prefix(*net)), accept()]);
    }
    t.rule("egress", vec![if policy.allow { accept() } else { drop() }]);
}

/// Applies `rules` with `nft -j -f -`, in namespace `ns` or the host's.
pub fn apply(rules: &Nftables<'_>, ns: Option<&str>) -> Result<()> {
    let json = serde_json::to_vec(rules).map_err(|e| Error::internal(e.to_string()))?;
    let mut cmd = Command::new("nft");
    cmd.args(["-j", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ns) = ns {
        let fd = super::links::ns_fd(ns)?;
        // SAFETY: the closure runs in the forked child before exec and makes one system call.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| {
        Error::internal(format!(
            "running nft: {e} (hearth needs nftables: apt-get install nftables)"
        ))
    })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(&json)
        .map_err(|e| Error::internal(format!("writing to nft: {e}")))?;
    let out = child
        .wait_with_output()
        .map_err(|e| Error::internal(format!("nft: {e}")))?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "nft refused the rules{}: {}",
            ns.map(|n| format!(" in {n}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes host table `name` (a missing one is already removed).
pub fn delete_table(name: &str) -> Result<()> {
    let mut batch = Batch::new();
    let table = || {
        NfListObject::Table(Table {
            family: NfFamily::INet,
            name: Cow::Owned(name.to_string()),
            handle: None,
        })
    };
    batch.add(table());
    batch.delete(table());
    apply(&batch.to_nftables(), None)
}

/// Whether the host has table `name` (when `nft` cannot say, it is taken to).
pub fn table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_or(true, |s| s.success())
}
