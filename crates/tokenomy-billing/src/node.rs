//! Opening a node's billing state from its data dir, and the first-run bootstrap.
//!
//! Files in the data dir (secrets mode 0600, written atomically: temp file, fsync, rename):
//! `tokenomy.toml` (prices and settings), `ledger.sqlite` (the embedded store),
//! `node.key` (the Ed25519 signing key, a signed-note private key), `node.pub` (its verifier
//! key), `checkpoint` (the last checkpoint signed), `admin.key` and `user.key` (first run),
//! `lock` (held by the one process serving the data dir), `first-run` (the keys of a first run
//! in progress).
//!
//! The first run is once per ledger, not per data dir: a data dir without `admin.key` on a
//! ledger that already has an admin key (a node added to a shared PostgreSQL ledger, or a lost
//! `admin.key`) gets an admin key of its own and nothing else. Two guards keep it so when a
//! first run is cut short or raced:
//! - its keys are made locally first and kept in `DATA_DIR/first-run` until `admin.key` and
//!   `user.key` are written, so a first run interrupted by a crash resumes with the same keys
//!   and finds what it had done (keys by hash, the grant by its idempotency key);
//! - the grant's idempotency key is one per ledger ([`FIRST_RUN_GRANT_KEY`]): of nodes that
//!   start on an empty PostgreSQL ledger at the same moment, one mints it and the others, finding
//!   the key taken by another account, revoke the key of the local user they made and join.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenomy_ledger::{AccountId, AccountKind, AnyStore, LedgerStore, PgStore, SqliteStore, OPERATOR_REVENUE};
use tokenomy_receipts::SignerKey;

use crate::config::{NodeConfig, DEFAULT_CONFIG_TOML};
use crate::{keys, log, rates, Billing, BillingError, Principal, Result, SCOPE_ADMIN, SCOPE_INFERENCE};

/// The first-run grant's idempotency key, one per ledger (see the module docs).
pub const FIRST_RUN_GRANT_KEY: &str = "first-run-grant";
/// The keys of a first run in progress: `admin <key>` and `user <key>` lines, mode 0600.
pub const FIRST_RUN_FILE: &str = "first-run";

/// PostgreSQL connections per node.
const PG_POOL_SIZE: usize = 16;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub data_dir: PathBuf,
    /// `postgres://…` for a shared store; SQLite in the data dir otherwise.
    pub database_url: Option<String>,
    /// Log origin for a new node key (default `tokenomy.local/node-<random>`).
    pub origin: Option<String>,
    /// Environment overrides (`TOKENOMY_PRICES__…`, `TOKENOMY_BILLING__…`).
    pub env: Vec<(String, String)>,
}

/// What the first start on an empty data dir created; shown once to the operator.
#[derive(Debug, Clone)]
pub struct FirstRun {
    pub admin_key: String,
    pub user_key: String,
    pub user_account: AccountId,
    pub grant_micros: i64,
}

/// The admin and user keys of the first run in progress at `path`, or new ones, written there
/// (mode 0600) before anything of the first run reaches the ledger.
fn read_or_start_first_run(path: &Path) -> Result<(String, String)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = |name: &str| {
                text.lines().find_map(|l| l.strip_prefix(name).map(|k| k.trim().to_string())).filter(|k| k.starts_with(keys::KEY_PREFIX))
            };
            match (key("admin "), key("user ")) {
                (Some(admin), Some(user)) => Ok((admin, user)),
                _ => Err(BillingError::Internal(format!(
                    "{} is not a first run's keys (`admin tk-…` and `user tk-…` lines); remove it to start the first run anew",
                    path.display()
                ))),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ((admin, _), (user, _)) = (keys::generate(), keys::generate());
            write_file(path, &format!("admin {admin}\nuser {user}\n"), true).map_err(io_err(path))?;
            Ok((admin, user))
        }
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Locks `DATA_DIR/lock` (released when the file is closed, or the process dies); refuses a
/// data dir another process holds.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(BillingError::Internal(format!(
            "another tokenomy process is using the data dir {} (it holds {}): stop it, or give this one a --data-dir of its own",
            dir.display(),
            path.display()
        ))),
        // A filesystem without locks (some network mounts) must not keep the node from
        // starting: it runs unguarded, and says so.
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot lock the data dir; make sure no other tokenomy process uses it");
            Ok(file)
        }
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> BillingError + '_ {
    move |e| BillingError::Internal(format!("{}: {e}", path.display()))
}

/// Creates the data dir (and its parents) readable by its owner only, as its keys are: the
/// ledger files in it hold every account's balance and every key's hash. An existing
/// directory is left as it is.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Writes `text` to `path` atomically; `secret` files get mode 0600.
pub(crate) fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub(crate) fn persist_checkpoint(dir: &Path, note: &str) -> std::io::Result<()> {
    write_file(&dir.join("checkpoint"), note, false)
}

fn read_or_create_config(dir: &Path, env: &[(String, String)]) -> Result<NodeConfig> {
    let path = dir.join("tokenomy.toml");
    if !path.exists() {
        write_file(&path, DEFAULT_CONFIG_TOML, false).map_err(io_err(&path))?;
    }
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    NodeConfig::parse(&text, env.iter().cloned()).map_err(BillingError::Invalid)
}

/// The data dir's node key, or a new one named `origin` (`true`: new, not yet written, so a
/// start refused before [`write_signer`], say for a name another node's key has, leaves no
/// key behind and can be retried with another `--origin`).
fn read_or_generate_signer(dir: &Path, origin: Option<&str>) -> Result<(SignerKey, bool)> {
    let path = dir.join("node.key");
    if path.exists() {
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        let key = SignerKey::parse(text.trim()).map_err(|e| BillingError::Invalid(format!("{}: {e}", path.display())))?;
        if let Some(o) = origin.filter(|o| *o != key.name()) {
            tracing::warn!("--origin {o:?} is not used: this data dir's node key is named {:?} (a name is given to a new key only)", key.name());
        }
        return Ok((key, false));
    }
    let name = origin.map_or_else(|| format!("tokenomy.local/node-{:08x}", rand::random::<u32>()), str::to_string);
    let key = SignerKey::generate(&name, &mut rand::rngs::OsRng).map_err(|e| BillingError::Invalid(format!("origin {name:?}: {e}")))?;
    Ok((key, true))
}

fn write_signer(dir: &Path, key: &SignerKey) -> Result<()> {
    let path = dir.join("node.key");
    write_file(&path, &format!("{}\n", key.to_key_string()), true).map_err(io_err(&path))?;
    let pub_path = dir.join("node.pub");
    write_file(&pub_path, &format!("{}\n", key.verifier()), false).map_err(io_err(&pub_path))
}

async fn open_store(dir: &Path, url: Option<&str>, timeout_ms: u64) -> Result<AnyStore> {
    Ok(match url {
        Some(u) => AnyStore::Pg(PgStore::open(u, PG_POOL_SIZE).await?.with_operation_timeout_ms(timeout_ms)),
        None => AnyStore::Sqlite(SqliteStore::open(dir.join("ledger.sqlite"))?),
    })
}

impl Billing {
    /// Opens (or creates) the node's state. On an empty data dir, also creates the admin key,
    /// a local user account with a starting grant and its inference key (see [`FirstRun`]).
    pub async fn open(opts: OpenOptions) -> Result<(Arc<Billing>, Option<FirstRun>)> {
        let dir = opts.data_dir.clone();
        create_private_dir(&dir).map_err(io_err(&dir))?;
        let data_dir_lock = lock_data_dir(&dir)?;
        let config = read_or_create_config(&dir, &opts.env)?;
        let (signer, fresh) = read_or_generate_signer(&dir, opts.origin.as_deref())?;
        let signed_before = !fresh;
        let store = open_store(&dir, opts.database_url.as_deref(), config.billing.ledger_timeout_ms).await?;
        if let AnyStore::Pg(pg) = &store {
            // (SQLite: the ledger's only node is this one.)
            pg.claim_origin(signer.name(), &signer.verifier().to_string()).await?;
        }
        if fresh {
            write_signer(&dir, &signer)?;
        }
        let cp_path = dir.join("checkpoint");
        let last = match std::fs::read_to_string(&cp_path) {
            Ok(note) => Some(log::LogState::open_signed(&note, &signer.verifier()).map_err(BillingError::Internal)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&cp_path)(e)),
        };
        let mut log = log::LogState::new(last.clone(), config.reference.as_ref().map(|r| r.price()));
        log.sync(&store).await?;
        if let Some(l) = &last {
            log.assert_consistent_with(&l.checkpoint, &store).await.map_err(|e| {
                let BillingError::LogRewritten(e) = e else { return e };
                BillingError::Internal(format!(
                    "{e}. The ledger went back under this node (a restored backup, a failover that lost commits): restore it to a state \
                     that extends the checkpoint in {}, or, to accept the loss, move that file aside (the node then signs a log that \
                     forks from the one it signed before; see the README)",
                    cp_path.display()
                ))
            })?;
        } else if signed_before && log.size() > 0 {
            // The file that lets a restart catch a ledger gone back is gone: say so loudly.
            tracing::error!(
                log_size = log.size(),
                "{} is missing: this node cannot check that its ledger did not go back (a restored backup); if it did, \
                 the checkpoints it signs from now on fork from those it signed before. Restore the file if you have it.",
                cp_path.display()
            );
        }
        // (On SQLite, where this node is the ledger's only one, nothing is published.)
        let published = match &store {
            AnyStore::Pg(pg) => {
                let size = pg.published_size(signer.name()).await?.unwrap_or(0);
                crate::Publication { signed_through: size, checkpoint_size: size }
            }
            _ => Default::default(),
        };
        let rates = rates::RateClocks::for_store(&store);
        let verifier = signer.verifier().to_string();
        let billing = Arc::new(Billing {
            rates,
            store,
            config,
            signer,
            data_dir: dir.clone(),
            log: tokio::sync::Mutex::new(log),
            live: Default::default(),
            settle_retries: Default::default(),
            halted: Default::default(),
            _data_dir_lock: data_dir_lock,
            local_user_key: Default::default(),
            req_hold_prefix: crate::hold_prefix(&verifier),
            published: tokio::sync::Mutex::new(published),
        });
        let waiting = billing.resume_unsettled().await;
        let voided = billing.void_orphaned_holds(waiting).await?;
        if voided > 0 {
            tracing::warn!(voided, "voided holds left by an earlier run");
        }
        let first = if dir.join("admin.key").exists() {
            None
        } else if dir.join(FIRST_RUN_FILE).exists() || !billing.ledger_has_admin_key().await? {
            billing.first_run().await?
        } else {
            let key = billing.issue_admin_key().await?;
            billing.join_ledger(&key)?;
            None
        };
        Ok((billing, first))
    }

    /// Voids holds no request will settle. On SQLite this process is the ledger's only user
    /// (it holds the data dir's lock), so every hold still pending at start belongs to a
    /// request that died with an earlier run: voided now, not a hold timeout later, the credits
    /// they held are free again and those requests' `Idempotency-Key` retries run at once
    /// (instead of a 409 "still in progress"). Not while a settlement of an earlier run waits
    /// in `DATA_DIR/unsettled/` (`waiting` of them: their holds are to be posted). On
    /// PostgreSQL, whose pending holds may be other nodes' requests in progress, only this
    /// node's own holds of requests without an `Idempotency-Key` (their keys name the node) and
    /// expired holds are voided; an idempotent request's hold names no node (a retry may come
    /// to any), so it waits for its timeout.
    async fn void_orphaned_holds(&self, waiting: usize) -> Result<u64> {
        if let (AnyStore::Pg(pg), 0) = (&self.store, waiting) {
            // Other nodes' holds may be requests in progress, but this node's own (their keys
            // name it) died with its earlier run: one process serves a data dir.
            let mut voided = self.expire_holds().await?;
            loop {
                let n = pg.void_pending_with_key_prefix(&self.req_hold_prefix).await?;
                voided += n;
                if n < tokenomy_ledger::sqlite::MAX_EXPIRE_PER_CALL {
                    return Ok(voided);
                }
            }
        }
        if !matches!(self.store, AnyStore::Sqlite(_)) || waiting > 0 {
            return self.expire_holds().await;
        }
        let mut voided = 0;
        loop {
            // Every pending hold has expired by the end of time.
            let n = self.store.expire_holds(i64::MAX).await?;
            voided += n;
            if n == 0 {
                return Ok(voided);
            }
        }
    }

    /// Whether the ledger was set up already (by another node sharing the database, or by
    /// this one before its `admin.key` was lost): it holds an admin key that is not revoked.
    async fn ledger_has_admin_key(&self) -> Result<bool> {
        let keys = self.store.list_keys(OPERATOR_REVENUE).await?;
        Ok(keys.iter().any(|k| k.revoked_at_ms.is_none() && k.scopes.iter().any(|s| s == SCOPE_ADMIN)))
    }

    /// A data dir without `admin.key` on a ledger set up before: only an admin key for it
    /// (`key`, already in the ledger). The local user and its grant are made once per ledger,
    /// so nodes added to a shared PostgreSQL ledger do not each mint credits.
    fn join_ledger(&self, key: &str) -> Result<()> {
        let path = self.data_dir.join("admin.key");
        write_file(&path, &format!("{key}\n"), true).map_err(io_err(&path))?;
        tracing::warn!(
            admin_key = %path.display(),
            "this data dir joins a ledger that was set up before: it got an admin key of its own, and no local user or grant \
             (copy user.key from the data dir that set the ledger up to serve that user with --no-auth here)"
        );
        Ok(())
    }

    /// Creates an admin key (the caller writes it to `DATA_DIR/admin.key`).
    async fn issue_admin_key(&self) -> Result<String> {
        let (key, hash) = keys::generate();
        self.store.create_key(OPERATOR_REVENUE, hash, &[SCOPE_ADMIN.to_string()], None, None, Default::default()).await?;
        Ok(key)
    }

    /// The first run, or its resumption from `DATA_DIR/first-run`; `None` if another node set
    /// the ledger up meanwhile (this data dir then joins it).
    async fn first_run(&self) -> Result<Option<FirstRun>> {
        let pending_path = self.data_dir.join(FIRST_RUN_FILE);
        let (admin_key, user_key) = read_or_start_first_run(&pending_path)?;
        let admin_id = self.key_by_hash_or(&admin_key, OPERATOR_REVENUE, SCOPE_ADMIN).await?;
        let admin = Principal {
            key_id: admin_id,
            account: OPERATOR_REVENUE,
            scopes: vec![SCOPE_ADMIN.into()],
            limits: Default::default(),
            caps: Default::default(),
            spend: Default::default(),
        };
        let (user_account, user_key_id) = match self.store.find_key_by_hash(keys::hash(&user_key)).await? {
            Some(k) => (k.account, k.id),
            None => match self.store.create_account("local", AccountKind::User).await {
                Ok(user) => (user.id, self.key_by_hash_or(&user_key, user.id, SCOPE_INFERENCE).await?),
                Err(tokenomy_ledger::LedgerError::NameTaken(_)) => {
                    // Another node's first run made the local user first: join its ledger.
                    // (So would this one's own attempt, had it crashed between making the
                    // account and its key: the node then joins, with no grant and its admin key.)
                    self.join_ledger(&admin_key)?;
                    std::fs::remove_file(&pending_path).map_err(io_err(&pending_path))?;
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            },
        };
        let grant = self.config.billing.first_run_grant_micros;
        if grant > 0 {
            match self.mint(user_account, grant, FIRST_RUN_GRANT_KEY, &admin).await {
                Ok(_) => {}
                Err(BillingError::Idempotency { code: "idempotency_key_reused", .. }) => {
                    // Another node's first run minted the grant first: join its ledger instead.
                    self.store.revoke_key(user_key_id).await?;
                    self.join_ledger(&admin_key)?;
                    std::fs::remove_file(&pending_path).map_err(io_err(&pending_path))?;
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        // admin.key last: its presence is what marks the first run done.
        let (user_path, admin_path) = (self.data_dir.join("user.key"), self.data_dir.join("admin.key"));
        write_file(&user_path, &format!("{user_key}\n"), true).map_err(io_err(&user_path))?;
        write_file(&admin_path, &format!("{admin_key}\n"), true).map_err(io_err(&admin_path))?;
        std::fs::remove_file(&pending_path).map_err(io_err(&pending_path))?;
        Ok(Some(FirstRun { admin_key, user_key, user_account, grant_micros: grant }))
    }

    /// The id of the key `key` (an earlier attempt of this first run made it), else of a new
    /// key of `account` with that hash and one scope.
    async fn key_by_hash_or(&self, key: &str, account: AccountId, scope: &str) -> Result<tokenomy_ledger::KeyId> {
        let hash = keys::hash(key);
        match self.store.find_key_by_hash(hash).await? {
            Some(k) => Ok(k.id),
            None => Ok(self.store.create_key(account, hash, &[scope.to_string()], None, None, Default::default()).await?),
        }
    }

    /// The local user's key (`DATA_DIR/user.key`), for `--no-auth` mode. The file is read
    /// once; the key is checked (revocation included) at every call.
    pub async fn local_principal(&self) -> Result<Principal> {
        let key = match self.local_user_key.get() {
            Some(key) => key,
            None => {
                let path = self.data_dir.join("user.key");
                let key = std::fs::read_to_string(&path).map_err(io_err(&path))?;
                self.local_user_key.get_or_init(|| key.trim().to_string())
            }
        };
        self.authenticate(Some(key)).await
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}
