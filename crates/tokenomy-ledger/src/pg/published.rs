//! What each node of one PostgreSQL ledger publishes so that any node can serve the receipts
//! it issued: its Ed25519 signature over each of its receipts (`receipt_signatures`, by log
//! index) and its latest signed checkpoint (`node_checkpoints`, one row per log name). The
//! store only keeps bytes: signing and checking are the billing layer's. A node writes the
//! signatures of its receipts up to a size before the checkpoint of that size, so a published
//! checkpoint that covers a receipt of its node means that receipt's signature is there too.

use super::*;

/// What the node named `origin` published that covers one log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedReceipt {
    /// The node's key (a signed-note verifier key string), as it claimed its name.
    pub verifier_key: String,
    /// Its latest published checkpoint (a signed note) and that checkpoint's size.
    pub checkpoint_note: String,
    pub checkpoint_size: u64,
    /// Its signature over the entry's canonical bytes, if it published one.
    pub signature: Option<Vec<u8>>,
}

/// Signatures written per statement.
const SIGNATURES_PER_INSERT: usize = 1_000;

impl PgStore {
    /// The size of the latest checkpoint the node named `origin` published (`None`: none).
    pub async fn published_size(&self, origin: &str) -> Result<Option<u64>> {
        let client = self.client().await?;
        let rows = client.query("SELECT size FROM node_checkpoints WHERE origin = $1", &[&origin]).await.map_err(pg_err)?;
        rows.first().map(|r| col::<i64>(r, 0).map(|s| s as u64)).transpose()
    }

    /// Stores signatures of log entries, `(log index, signature)`; one stored already is kept.
    pub async fn publish_signatures(&self, signatures: &[(u64, [u8; 64])]) -> Result<()> {
        const INSERT: &str = "INSERT INTO receipt_signatures (log_index, signature) \
                              SELECT * FROM unnest($1::bigint[], $2::bytea[]) ON CONFLICT (log_index) DO NOTHING";
        let client = self.client().await?;
        for chunk in signatures.chunks(SIGNATURES_PER_INSERT) {
            let index: Vec<i64> = chunk.iter().map(|(i, _)| *i as i64).collect();
            let sigs: Vec<&[u8]> = chunk.iter().map(|(_, s)| &s[..]).collect();
            client.execute(INSERT, &[&index, &sigs]).await.map_err(pg_err)?;
        }
        Ok(())
    }

    /// Publishes `note`, the checkpoint of size `size` the node named `origin` signed, unless
    /// it published a larger one already (a published checkpoint never shrinks).
    pub async fn publish_checkpoint(&self, origin: &str, size: u64, note: &str) -> Result<()> {
        const UPSERT: &str = "INSERT INTO node_checkpoints (origin, size, note, updated_at_ms) VALUES ($1, $2, $3, $4) \
                              ON CONFLICT (origin) DO UPDATE SET size = EXCLUDED.size, note = EXCLUDED.note, \
                              updated_at_ms = EXCLUDED.updated_at_ms WHERE node_checkpoints.size < EXCLUDED.size";
        let client = self.client().await?;
        client.execute(UPSERT, &[&origin, &(size as i64), &note, &crate::now_ms()]).await.map_err(pg_err)?;
        Ok(())
    }

    /// What the node named `origin` published for the entry at `log_index`: its key, its
    /// latest checkpoint and its signature of the entry (`None`: it published no checkpoint).
    pub async fn published_receipt(&self, origin: &str, log_index: u64) -> Result<Option<PublishedReceipt>> {
        const SQL: &str = "SELECT o.verifier_key, c.note, c.size, s.signature FROM node_checkpoints c \
                           JOIN node_origins o ON o.origin = c.origin \
                           LEFT JOIN receipt_signatures s ON s.log_index = $2 WHERE c.origin = $1";
        let client = self.client().await?;
        let rows = client.query(SQL, &[&origin, &(log_index as i64)]).await.map_err(pg_err)?;
        let Some(row) = rows.first() else { return Ok(None) };
        Ok(Some(PublishedReceipt {
            verifier_key: col(row, 0)?,
            checkpoint_note: col(row, 1)?,
            checkpoint_size: col::<i64>(row, 2)? as u64,
            signature: col(row, 3)?,
        }))
    }

    /// Every node key of this ledger, `(log name, verifier key)`, by name.
    pub async fn node_keys(&self) -> Result<Vec<(String, String)>> {
        let client = self.client().await?;
        let rows = client.query("SELECT origin, verifier_key FROM node_origins ORDER BY origin", &[]).await.map_err(pg_err)?;
        rows.iter().map(|r| Ok((col(r, 0)?, col(r, 1)?))).collect()
    }
}
