//! The model registry's rows: what `follower models` registers, verifies and removes.

use super::*;

/// A model registered on the device (`<state-dir>/models/<file>`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelRow {
    /// Name steps ask for (`model:`), unique on the device.
    pub name: String,
    /// File name inside `<state-dir>/models/`.
    pub file: String,
    /// SHA-256 of the file, lowercase hex.
    pub sha256: String,
    /// File size, bytes.
    pub size: u64,
    /// `general.architecture` (`llama`, …).
    pub architecture: String,
    /// Quantization (`Q4_1`, …).
    pub quantization: String,
    /// The model's training context, tokens.
    pub context_length: u64,
    /// Number of weights.
    pub parameters: u64,
    /// Estimated RAM to run it (weights + KV cache for the default context + compute), bytes.
    pub ram_needed_bytes: u64,
    /// `general.license`, or empty.
    pub license: String,
    /// When it was registered (RFC 3339).
    pub added_at: String,
    /// When its hash was last computed (RFC 3339).
    pub verified_at: String,
    /// File identity when it was hashed (device, inode, size, mtime, ctime): unchanged means the hash
    /// still holds.
    pub verified_stamp: String,
}

impl Store {
    /// Registers (or replaces) a model.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn put_model(&self, m: &ModelRow) -> Result<(), StoreError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO models (name, file, sha256, size, architecture, quantization,
                context_length, parameters, ram_needed_bytes, license, added_at, verified_at,
                verified_stamp)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            rusqlite::params![
                m.name,
                m.file,
                m.sha256,
                sql_int(m.size),
                m.architecture,
                m.quantization,
                sql_int(m.context_length),
                sql_int(m.parameters),
                sql_int(m.ram_needed_bytes),
                m.license,
                m.added_at,
                m.verified_at,
                m.verified_stamp
            ],
        )?;
        Ok(())
    }

    /// The registered models, by name.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn models(&self) -> Result<Vec<ModelRow>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT name, file, sha256, size, architecture, quantization, context_length,
                    parameters, ram_needed_bytes, license, added_at, verified_at, verified_stamp
             FROM models ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(ModelRow {
                name: r.get(0)?,
                file: r.get(1)?,
                sha256: r.get(2)?,
                size: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
                architecture: r.get(4)?,
                quantization: r.get(5)?,
                context_length: u64::try_from(r.get::<_, i64>(6)?).unwrap_or(0),
                parameters: u64::try_from(r.get::<_, i64>(7)?).unwrap_or(0),
                ram_needed_bytes: u64::try_from(r.get::<_, i64>(8)?).unwrap_or(0),
                license: r.get(9)?,
                added_at: r.get(10)?,
                verified_at: r.get(11)?,
                verified_stamp: r.get(12)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records that model `name` was hashed again at `now` with file identity `stamp`.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn mark_model_verified(
        &self,
        name: &str,
        now: &str,
        stamp: &str,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE models SET verified_at = ?2, verified_stamp = ?3 WHERE name = ?1",
            rusqlite::params![name, now, stamp],
        )?;
        Ok(())
    }

    /// Forgets model `name`; whether it was registered.
    ///
    /// # Errors
    /// On SQLite failure.
    pub fn remove_model(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .execute("DELETE FROM models WHERE name = ?1", [name])?
            > 0)
    }
}
