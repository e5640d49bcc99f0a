//! Responses kept for OpenAI's Responses API (`store`) in the shared database, so that every
//! node of one PostgreSQL ledger continues a conversation that another node answered
//! (`previous_response_id`), reads it back and deletes it. Not ledger state: no money moves,
//! nothing is signed. A document is opaque bytes here (the API layer encodes it); the store
//! only bounds what it keeps, as the node's own memory store does: per owner and in all, in
//! count and bytes, oldest first out ([`KeptLimits`]). Two nodes keeping at once may each
//! evict, so a bound can be undershot by a few documents, never overshot once both commit.

use super::*;

/// Bounds on kept documents: per owning account (a node without accounts is one owner) and
/// in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeptLimits {
    pub count_max: u64,
    pub bytes_max: u64,
    pub per_owner_count_max: u64,
    pub per_owner_bytes_max: u64,
}

/// A kept document and the account that owns it (`None`: kept by a node without accounts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeptDoc {
    pub owner: Option<AccountId>,
    pub doc: Vec<u8>,
}

fn owner_bytes(owner: Option<AccountId>) -> Vec<u8> {
    owner.map_or_else(Vec::new, |a| a.to_bytes().to_vec())
}

/// Deletes the rows past the newest `$n` rows or `$n+1` bytes of the rows chosen by `scope`.
fn evict_sql(scope: &str, n: usize) -> String {
    format!(
        "DELETE FROM kept_responses WHERE seq IN (SELECT seq FROM (SELECT seq, count(*) OVER w AS n, (sum(bytes) OVER w)::bigint AS b \
         FROM kept_responses WHERE {scope} WINDOW w AS (ORDER BY seq DESC)) t WHERE t.n > ${n} OR t.b > ${})",
        n + 1
    )
}

impl PgStore {
    /// Keeps `doc` under `id` for `owner`, then drops the oldest documents past `limits`
    /// (the owner's own first). A document larger than a bound is not kept (`false`).
    pub async fn keep_response(&self, id: &str, owner: Option<AccountId>, doc: &[u8], limits: KeptLimits) -> Result<bool> {
        let bytes = doc.len() as u64;
        if bytes > limits.bytes_max || (owner.is_some() && bytes > limits.per_owner_bytes_max) {
            return Ok(false);
        }
        let (id, owner_id, doc) = (id.to_owned(), owner_bytes(owner), doc.to_vec());
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let (bytes, count_max, bytes_max) = (as_i64(bytes), as_i64(limits.count_max), as_i64(limits.bytes_max));
        let (own_count_max, own_bytes_max) = (as_i64(limits.per_owner_count_max), as_i64(limits.per_owner_bytes_max));
        self.in_tx(|tx| {
            let (id, owner_id, doc) = (id.clone(), owner_id.clone(), doc.clone());
            Box::pin(async move {
                // Soft state: a database crash may lose the last kept documents.
                tx.batch_execute("SET LOCAL synchronous_commit = off").await.map_err(pg_err)?;
                let insert = "INSERT INTO kept_responses (id, owner, bytes, doc) VALUES ($1, $2, $3, $4) \
                              ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, bytes = EXCLUDED.bytes, doc = EXCLUDED.doc";
                execute(tx, insert, &[&id, &owner_id, &bytes, &doc]).await?;
                if !owner_id.is_empty() {
                    execute(tx, &evict_sql("owner = $1", 2), &[&owner_id, &own_count_max, &own_bytes_max]).await?;
                }
                execute(tx, &evict_sql("TRUE", 1), &[&count_max, &bytes_max]).await?;
                Ok(())
            })
        })
        .await?;
        Ok(true)
    }

    /// The document kept under `id`, with its owner.
    pub async fn kept_response(&self, id: &str) -> Result<Option<KeptDoc>> {
        let client = self.client().await?;
        let stmt = client.prepare_cached("SELECT owner, doc FROM kept_responses WHERE id = $1").await.map_err(pg_err)?;
        let rows = client.query(&stmt, &[&id]).await.map_err(pg_err)?;
        let Some(row) = rows.first() else { return Ok(None) };
        let owner: &[u8] = col(row, 0)?;
        let owner = match owner.len() {
            0 => None,
            _ => Some(AccountId::from_slice(owner).ok_or_else(|| LedgerError::Storage("bad owner column".into()))?),
        };
        Ok(Some(KeptDoc { owner, doc: col(row, 1)? }))
    }

    /// Deletes the document kept under `id` if `caller` may: its owner, or anyone for one kept
    /// without an owner. Whether one was deleted.
    pub async fn forget_response(&self, id: &str, caller: Option<AccountId>) -> Result<bool> {
        let client = self.client().await?;
        let sql = "DELETE FROM kept_responses WHERE id = $1 AND (owner = ''::bytea OR owner = $2)";
        let n = client.execute(sql, &[&id, &owner_bytes(caller)]).await.map_err(pg_err)?;
        Ok(n > 0)
    }
}
