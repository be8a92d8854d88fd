//! Session ids: random, never 0, unique among live sessions.
//!
//! A session id travels in every frame header and input datagram, and nodes are run by
//! strangers, so an id must not tell anyone what the next or any other live session's id is. The
//! relay also checks which connection a frame came from (see
//! `game::GameService::node_frames_loop`); the id being unguessable is the second lock, not the
//! only one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// The ids of live sessions (game and inference alike). A clone shares the same set (the
/// trunk holds peers' game session ids in it).
#[derive(Debug, Default, Clone)]
pub struct SessionIds {
    live: Arc<Mutex<HashSet<u64>>>,
}

impl SessionIds {
    /// A fresh id from the thread-local CSPRNG (ChaCha seeded from the OS), held until the
    /// returned guard is dropped.
    pub fn mint(&self) -> SessionId {
        self.mint_with(rand::random::<u64>)
    }

    /// Like [`Self::mint`], drawing candidates from `draw`: 0 and ids already live are drawn
    /// again, so the result is unique among live sessions whatever `draw` returns (tests use a
    /// scripted source to force collisions).
    pub fn mint_with(&self, mut draw: impl FnMut() -> u64) -> SessionId {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let id = draw();
            if id != 0 && live.insert(id) {
                return SessionId {
                    id,
                    live: self.live.clone(),
                };
            }
        }
    }

    /// Holds a given id (a session resumed from another gateway keeps its id), or `None` when
    /// it is 0 or already live here.
    pub fn claim(&self, id: u64) -> Option<SessionId> {
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        (id != 0 && live.insert(id)).then(|| SessionId {
            id,
            live: self.live.clone(),
        })
    }

    /// How many ids are held now.
    pub fn live(&self) -> usize {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A live session id; dropping it frees the id.
#[derive(Debug)]
pub struct SessionId {
    id: u64,
    live: Arc<Mutex<HashSet<u64>>>,
}

impl SessionId {
    pub fn get(&self) -> u64 {
        self.id
    }
}

impl Drop for SessionId {
    fn drop(&mut self) {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_not_sequential_or_predictable() {
        let ids = SessionIds::default();
        let minted: Vec<SessionId> = (0..200).map(|_| ids.mint()).collect();
        let values: Vec<u64> = minted.iter().map(SessionId::get).collect();
        assert!(values.iter().all(|&v| v != 0));
        let distinct: HashSet<u64> = values.iter().copied().collect();
        assert_eq!(distinct.len(), values.len());
        // A counter (the old `next_session`) differs by 1 from one id to the next; uniformly
        // random ids differ by less than 2^32 with probability about 2^-31 per pair.
        for w in values.windows(2) {
            assert!(
                w[0].abs_diff(w[1]) > 1 << 32,
                "consecutive ids {} and {} are close",
                w[0],
                w[1]
            );
        }
        // Bits are spread: the high half is not always zero (a small counter's would be).
        assert!(values.iter().any(|v| v >> 32 != 0));
        assert_eq!(ids.live(), 200);
        drop(minted);
        assert_eq!(ids.live(), 0);
    }

    #[test]
    fn a_colliding_or_zero_draw_is_drawn_again() {
        let ids = SessionIds::default();
        let mut script = [7u64, 0, 7, 7, 9].into_iter();
        let mut draw = || script.next().expect("script exhausted");
        let a = ids.mint_with(&mut draw);
        let b = ids.mint_with(&mut draw);
        assert_eq!((a.get(), b.get()), (7, 9));
        // Once the session ends its id may come back.
        drop(a);
        let c = ids.mint_with(|| 7);
        assert_eq!(c.get(), 7);
    }
}
