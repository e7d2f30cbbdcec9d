//! Published ports: which host port relays to which guest port of which machine.

use super::Store;
use crate::error::{Error, Result};
use hearth_api::PublishedPort;
use rusqlite::{params, OptionalExtension, Row};

fn from_row(r: &Row) -> rusqlite::Result<PublishedPort> {
    Ok(PublishedPort {
        id: r.get("id")?,
        machine_id: r.get("machine_id")?,
        name: r.get("name")?,
        port: r.get("port")?,
        host_port: r.get("host_port")?,
        protocol: r.get("protocol")?,
        created_at: r.get("created_at")?,
    })
}

impl Store {
    /// Records a port; an id the machine has or a host port already taken is a conflict.
    pub fn insert_port(&self, p: &PublishedPort) -> Result<()> {
        let res = self.conn().execute(
            "INSERT INTO published_ports (id, machine_id, name, port, host_port, protocol, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![p.id, p.machine_id, p.name, p.port, p.host_port, p.protocol, p.created_at],
        );
        match res {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, msg))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                let what = if msg.as_deref().unwrap_or("").contains("host_port") {
                    format!("host port {} is already published", p.host_port)
                } else {
                    format!(
                        "machine {} already has published port {}",
                        p.machine_id, p.id
                    )
                };
                Err(Error::conflict(what))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn get_port(&self, machine_id: &str, id: &str) -> Result<Option<PublishedPort>> {
        Ok(self
            .conn()
            .query_row(
                "SELECT * FROM published_ports WHERE machine_id = ?1 AND id = ?2",
                [machine_id, id],
                from_row,
            )
            .optional()?)
    }

    /// The ports of one machine, or of all.
    pub fn list_ports(&self, machine_id: Option<&str>) -> Result<Vec<PublishedPort>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT * FROM published_ports WHERE ?1 IS NULL OR machine_id = ?1
             ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([machine_id], from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Host ports in use by any machine.
    pub fn used_host_ports(&self) -> Result<Vec<u16>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT host_port FROM published_ports")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn delete_port(&self, machine_id: &str, id: &str) -> Result<()> {
        self.conn().execute(
            "DELETE FROM published_ports WHERE machine_id = ?1 AND id = ?2",
            [machine_id, id],
        )?;
        Ok(())
    }
}
