//! The `Idempotency-Key` protocol of `POST /orders`, apart from HTTP: a key is claimed by one
//! request, which runs and stores its answer; a retry with the same key and body replays that
//! answer, one with another body is refused, and one that finds the first attempt in flight
//! waits for it. A first attempt that will never answer (its process died, or the request was
//! dropped: deadline, client gone, a 5xx after its order was placed) is taken over by the next
//! retry within about a second: it answers with the order the first attempt placed, or starts
//! afresh under a new order id if none was. Never two orders for one key.
//!
//! The states live in the `idempotency_keys` table ([`Store::claim_key`] and neighbours); this
//! module is the protocol over them.

use std::time::Duration;

use uuid::Uuid;

use crate::domain::Status;
use crate::error::Error;
use crate::store::{Claim, KeyAnswer, NewOrder, Order, Store, StoredResponse};

/// How often a request looks again at a key whose first attempt is in flight (a read).
const KEY_POLL: Duration = Duration::from_millis(100);
/// How often such a request tries to claim the key again (a write), to notice an abandoned
/// first attempt.
const KEY_RECLAIM: Duration = Duration::from_secs(1);

/// How a request with a key begins.
#[derive(Debug)]
pub enum Begun {
    /// The key is this request's: run, then [`Claimed::finish`] (or release) it.
    Claimed(Claimed),
    /// The key was answered before: this is the answer, to send again as it was.
    Replay(StoredResponse),
    /// The key's first attempt placed its order but never answered: this is its answer now,
    /// stored under the key. (Lines ordered from the cart stay in the cart: the first
    /// attempt's request, which knew them, is gone.)
    Recovered {
        /// The order it placed.
        order_id: Uuid,
        /// Its answer.
        answer: StoredResponse,
    },
}

/// Begins a request with `user`'s `key` for a body hashing to `hash`. Waits, until `until`
/// (the caller's patience), for a first attempt in flight to answer or to be found abandoned;
/// [`Error::InFlight`] if neither happens by then. `answer_of` renders the answer for an
/// order placed by an abandoned first attempt. With `priced`, a new key is claimed with that
/// order stored as pending in the same transaction ([`Claimed::placed`]).
pub async fn begin(
    store: &Store,
    user: Uuid,
    key: &str,
    hash: &str,
    until: tokio::time::Instant,
    answer_of: impl Fn(Order) -> Result<StoredResponse, Error>,
    mut priced: Option<&NewOrder>,
) -> Result<Begun, Error> {
    loop {
        // Only the first try places: after a wait the prices may have changed.
        let claim = match priced.take() {
            Some(order) => (store.claim_key_placing(user, key, hash, order).await?, true),
            None => (store.claim_key(user, key, hash).await?, false),
        };
        match claim.0 {
            Claim::Claimed(order_id) => {
                let mut claimed = Claimed::new(store, user, key, order_id);
                claimed.placed = claim.1;
                return Ok(Begun::Claimed(claimed));
            }
            Claim::Replay(response) => return Ok(Begun::Replay(response)),
            Claim::Mismatch => return Err(Error::KeyReused),
            Claim::InFlight => {}
            Claim::Abandoned(order_id) => match store.order(order_id).await? {
                // The abandoned attempt placed its order: that is the answer, never a second.
                Some(order) if !matches!(order.status, Status::Pending | Status::Rejected) => {
                    let order_id = order.id;
                    let answer = answer_of(order)?;
                    if store.finish_key(user, key, order_id, &answer).await? {
                        return Ok(Begun::Recovered { order_id, answer });
                    }
                    // Answered or taken over by another retry meanwhile: look again.
                }
                // Its reservation is being settled by the worker: wait for it.
                Some(order) if order.status == Status::Pending => {}
                // It placed nothing (or was rejected): start afresh under a new order id.
                _ => {
                    if let Some(fresh) = store.retake_key(user, key, order_id).await? {
                        return Ok(Begun::Claimed(Claimed::new(store, user, key, fresh)));
                    }
                }
            },
        }
        // Read until the key is answered (or released), claiming again at least every
        // KEY_RECLAIM, which is when an abandoned first attempt is noticed: a waiter costs
        // reads, not a write every poll.
        let reclaim = tokio::time::Instant::now() + KEY_RECLAIM;
        loop {
            if tokio::time::Instant::now() + KEY_POLL >= until {
                return Err(Error::InFlight);
            }
            tokio::time::sleep(KEY_POLL).await;
            if tokio::time::Instant::now() >= reclaim || !store.key_pending(user, key).await? {
                break;
            }
        }
    }
}

/// A key this request holds. It ends answered ([`finish`](Claimed::finish)), forgotten
/// ([`release`](Claimed::release)) or abandoned: explicitly ([`abandon`](Claimed::abandon)),
/// or when the request is dropped before either (its deadline passed, its client went away);
/// then the next retry takes the key over at once instead of waiting for it to age.
#[derive(Debug)]
pub struct Claimed {
    store: Store,
    user: Uuid,
    key: String,
    order_id: Uuid,
    /// The pending order was stored with the claim.
    placed: bool,
    settled: bool,
}

impl Claimed {
    fn new(store: &Store, user: Uuid, key: &str, order_id: Uuid) -> Self {
        Claimed {
            store: store.clone(),
            user,
            key: key.to_owned(),
            order_id,
            placed: false,
            settled: false,
        }
    }

    /// The id the order placed under this key gets.
    pub fn order_id(&self) -> Uuid {
        self.order_id
    }

    /// Whether the order priced for [`begin`] was stored as pending with the claim (then
    /// [`Saga::place_priced`](crate::saga::Saga::place_priced) goes on from there).
    pub fn placed(&self) -> bool {
        self.placed
    }

    /// The key's answer, to store in the transaction that places its order (`render` makes
    /// it from the order); then [`Claimed::answered`] says how that went.
    pub fn answer<'a>(
        &'a self,
        render: &'a (dyn Fn(&Order) -> Result<StoredResponse, Error> + Send + Sync),
    ) -> KeyAnswer<'a> {
        KeyAnswer {
            user: self.user,
            key: &self.key,
            render,
        }
    }

    /// The answer was stored with the order (or found taken over, `Answered::TakenOver`):
    /// the key is settled, nothing more to write.
    pub fn answered(mut self) {
        self.settled = true;
    }

    /// Stores the answer: retries replay it. `false` if the key is no longer this request's
    /// (taken over while it ran: its process was frozen past its lease); nothing is written.
    pub async fn finish(mut self, answer: &StoredResponse) -> Result<bool, Error> {
        let kept = self
            .store
            .finish_key(self.user, &self.key, self.order_id, answer)
            .await?;
        self.settled = true;
        Ok(kept)
    }

    /// Forgets the key (nothing was placed; a retry starts afresh). A key no longer this
    /// request's (released by the saga's rollback and claimed again by a retry since) is left
    /// alone.
    pub async fn release(mut self) -> Result<(), Error> {
        self.store
            .release_key(self.user, &self.key, self.order_id)
            .await?;
        self.settled = true;
        Ok(())
    }

    /// Leaves the key unanswered for the next retry to take over now: it answers with the
    /// order if one was placed (a failure after placing it), or starts afresh.
    pub async fn abandon(mut self) -> Result<(), Error> {
        self.store
            .abandon_key(self.user, &self.key, self.order_id)
            .await?;
        self.settled = true;
        Ok(())
    }
}

impl Drop for Claimed {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped mid-request. Marking it is a write: hand it to the runtime (this runs inside
        // one, where requests are dropped). If it fails, the key is still taken over once its
        // age says so (`ABANDONED_AFTER`).
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (store, user, key, order_id) = (
            self.store.clone(),
            self.user,
            std::mem::take(&mut self.key),
            self.order_id,
        );
        runtime.spawn(async move {
            if let Err(e) = store.abandon_key(user, &key, order_id).await {
                tracing::warn!(%user, error = %e, "could not mark a dropped request's key abandoned");
            }
        });
    }
}
