//! Trust roots and installed traces: versions never go backwards (checked inside the
//! writing transaction, against the trust root the verification used), the install log.

use super::*;

impl Store {
    /// The newest installed trust root (decoded) and its file bytes.
    ///
    /// # Errors
    /// On SQLite failure or a stored root that no longer decodes.
    pub fn trust_root(&self) -> Result<Option<(TrustRoot, Vec<u8>)>, StoreError> {
        let row: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT root_file FROM trust_roots ORDER BY version DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        row.map(|bytes| {
            decode_root(&bytes)
                .map(|(_, root)| (root, bytes))
                .map_err(|e| StoreError::Corrupt {
                    what: "trust root",
                    detail: e.to_string(),
                })
        })
        .transpose()
    }

    /// Stores verified trust roots (oldest first) in one transaction.
    ///
    /// # Errors
    /// On SQLite failure (nothing is stored then).
    pub fn add_trust_roots(
        &mut self,
        base: Option<u32>,
        roots: &[(u32, &[u8])],
        now: &str,
    ) -> Result<(), StoreError> {
        self.install_all(base, roots, &[], now, &mut || Ok(()))
    }

    /// The installed version of a trace.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_version(&self, trace_id: &str) -> Result<Option<Version>, StoreError> {
        Ok(installed_version_in(&self.conn, trace_id)?)
    }

    /// Installs a verified signed trace, refusing a version that is not above the installed
    /// one. The check and the write are one transaction.
    ///
    /// # Errors
    /// [`StoreError::Rollback`] or an SQLite failure; the store is unchanged then.
    pub fn install_trace(
        &mut self,
        base: Option<u32>,
        trace_id: &str,
        version: Version,
        signed: &[u8],
        now: &str,
    ) -> Result<(), StoreError> {
        self.install_all(base, &[], &[(trace_id, version, signed)], now, &mut || {
            Ok(())
        })
    }

    /// Installs trust roots and traces together: every trace version must be above the
    /// installed one, or nothing is written.
    ///
    /// # Errors
    /// [`StoreError::Rollback`] or an SQLite failure; the store is unchanged then.
    pub fn install_all(
        &mut self,
        base: Option<u32>,
        roots: &[(u32, &[u8])],
        traces: &[(&str, Version, &[u8])],
        now: &str,
        before_commit: &mut dyn FnMut() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        check_base(&tx, base)?;
        for (version, bytes) in roots {
            tx.execute(
                "INSERT INTO trust_roots (version, root_file, installed_at) VALUES (?1, ?2, ?3)",
                params![version, bytes, now],
            )?;
            tx.execute(
                "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, 'trust_root', 'root', ?2, 'installed', '')",
                params![now, version.to_string()],
            )?;
        }
        for (trace_id, version, signed) in traces {
            let installed = installed_version_in(&tx, trace_id)?;
            if let Some(have) = installed
                && *version <= have
            {
                return Err(StoreError::Rollback {
                    trace_id: (*trace_id).to_owned(),
                    installed: have,
                    offered: *version,
                });
            }
            tx.execute(
                "INSERT OR REPLACE INTO installed_traces (trace_id, major, minor, patch, signed, installed_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![trace_id, version.major, version.minor, version.patch, signed, now],
            )?;
            tx.execute(
                "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, 'trace', ?2, ?3, 'installed', '')",
                params![now, trace_id, version.to_string()],
            )?;
        }
        // Every check passed and the rows are written: place files, then commit.
        before_commit()?;
        tx.commit()?;
        Ok(())
    }

    /// Records a refused install (the refusal itself changes nothing else).
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn log_refusal(
        &self,
        kind: &str,
        name: &str,
        detail: &str,
        now: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT INTO install_log (at, kind, name, version, outcome, detail) VALUES (?1, ?2, ?3, '', 'refused', ?4)",
            params![now, kind, name, detail],
        )?;
        Ok(())
    }

    /// Installed traces: (id, version, signed bytes), by id.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_traces(&self) -> Result<Vec<(String, Version, Vec<u8>)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT trace_id, major, minor, patch, signed FROM installed_traces ORDER BY trace_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get(0)?,
                Version {
                    major: r.get(1)?,
                    minor: r.get(2)?,
                    patch: r.get(3)?,
                },
                r.get(4)?,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The signed bytes of an installed trace.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn installed_signed(&self, trace_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .conn
            .query_row(
                "SELECT signed FROM installed_traces WHERE trace_id = ?1",
                [trace_id],
                |r| r.get(0),
            )
            .optional()?)
    }
}

/// Refuses to write when the newest stored trust root is not the one a verification used.
fn check_base(tx: &rusqlite::Transaction<'_>, base: Option<u32>) -> Result<(), StoreError> {
    let found: Option<u32> =
        tx.query_row("SELECT MAX(version) FROM trust_roots", [], |r| r.get(0))?;
    if found == base {
        Ok(())
    } else {
        Err(StoreError::RootChanged {
            expected: base,
            found,
        })
    }
}

/// The installed version of a trace, read through `conn` (a transaction derefs to one).
fn installed_version_in(conn: &Connection, trace_id: &str) -> rusqlite::Result<Option<Version>> {
    conn.query_row(
        "SELECT major, minor, patch FROM installed_traces WHERE trace_id = ?1",
        [trace_id],
        |r| {
            Ok(Version {
                major: r.get(0)?,
                minor: r.get(1)?,
                patch: r.get(2)?,
            })
        },
    )
    .optional()
}
