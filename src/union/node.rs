//! The inode table: FUSE node ids to union nodes, with lookup counts, and the (parent, name)
//! index that makes repeated lookups of one name return one node.
//!
//! Lock order: a directory's `dir_lock` (two at once: lower node id first) -> `copy_lock`s from
//! the root down -> a non-directory's object lock (`Node::reach`; one at a time) -> index shard
//! -> table shard -> `state` (held briefly, never across the others).
//! `moved` is taken with no shard held, before a table shard. `dirmoves` is no lock: its
//! readers retry and its writers never wait.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::hash::{BuildHasher, Hash, Hasher};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

pub const ROOT_ID: u64 = 1;
const SHARDS: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    pub fn from_mode(mode: u32) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => Kind::File,
        }
    }
}

/// A node's layers, top first: one for a non-directory, and few for most directories, so
/// held inline (no allocation per node).
pub type Layers = smallvec::SmallVec<[usize; 2]>;

/// Where a node lives now. Mutated only under the parent's `dir_lock` (rename, unlink) or the
/// node's `copy_lock` (copy-up).
///
/// What few nodes need (a redirect, a metacopy's data, hard-link aliases, ...) is boxed in
/// `Rare`, allocated at its first write: a rootfs walk holds a node per file, and most are
/// a name in one layer. Its fields read and write as the state's own (`Deref`).
#[derive(Clone, Debug)]
pub struct NodeState {
    pub parent: u64,
    /// Shared with the name index's key (one copy of each name in memory).
    pub name: Arc<OsStr>,
    /// Layers holding this object, top first. A non-directory has exactly one; a directory has
    /// every layer merged into it (down to an opaque or non-directory entry).
    pub layers: Layers,
    rare: Option<Box<Rare>>,
}

/// The state only some nodes have; see `NodeState`.
#[derive(Clone, Debug)]
pub struct Rare {
    /// Removed from the union while still referenced (open or not yet forgotten).
    pub unlinked: bool,
    /// For a retired node (see `Node::is_retired`): the number (natural id) its object is
    /// looked up by now, which finds the live node that has its names (0 before).
    pub successor_ino: u64,
    /// For a renamed (redirected) directory: its path, from the root, in the layers below
    /// `redirect_layer` (the layer whose copy carries the redirect).
    pub lower_path: Option<Arc<Vec<OsString>>>,
    pub redirect_layer: usize,
    /// Unlinked, but a lower hard link whose other names (not looked up yet) reach its copy
    /// through the index: their lookups revive this node, so the kernel keeps one inode for
    /// the file (an fd still open on the removed name sees changes made through them).
    pub named_elsewhere: bool,
    /// For an unlinked object: an O_PATH fd that keeps reaching it (for a directory, in its
    /// top layer only).
    pub detached: Option<Arc<OwnedFd>>,
    /// For a hard link one of whose names went while others were left: an O_PATH fd on its
    /// object in the layer it was in then. It reaches the object when no name the daemon
    /// knows is left: the kernel forgot the directories of the others, but its FORGETs came
    /// in after the removal (/dev/fuse and io_uring are not ordered), so the file, still
    /// open by the removed name, was not taken for unlinked then.
    pub kept: Option<(usize, Arc<OwnedFd>)>,
    /// While renames or unlinks change the node's names on disk: for each, an O_PATH fd on
    /// its object in its top layer then, by which it is reached until its names say what the
    /// disk does (a name may meanwhile be a whiteout, or another file's). Several at once
    /// for a hard link whose names change in different directories.
    pub moving: Vec<(usize, Arc<OwnedFd>)>,
    /// Other names of a hard-linked non-directory (same real inode, so the same node).
    pub aliases: Vec<(u64, Arc<OsStr>)>,
    /// For a metadata-only copy (metacopy): where its data lives.
    pub data: Option<Arc<DataSrc>>,
    /// Copied up whole (empty, or a hard link) where the kernel's copy would still be
    /// metadata-only (metacopy=on): moves and links refuse where its redirect would be too
    /// long. Recorded on the copy (`MarkerNs::whole_copy`), so known after a remount and to
    /// every name of a hard link.
    pub kernel_meta: bool,
    /// For such a copy once moved: where the kernel's copy's redirect points (kept, as the
    /// kernel keeps a redirect, by later moves).
    pub kernel_redirect: Option<Box<[OsString]>>,
    /// A directory whose upper copy is marked impure (see `origin.rs`).
    pub impure: bool,
    /// An upper non-directory that is the index's entry for its origin: `overlay.nlink`
    /// counts its links (see `index.rs`).
    pub indexed: bool,
}

impl Rare {
    const NONE: Rare = Rare {
        unlinked: false,
        successor_ino: 0,
        lower_path: None,
        redirect_layer: 0,
        named_elsewhere: false,
        detached: None,
        kept: None,
        moving: Vec::new(),
        aliases: Vec::new(),
        data: None,
        kernel_meta: false,
        kernel_redirect: None,
        impure: false,
        indexed: false,
    };

    fn is_none(&self) -> bool {
        !self.unlinked
            && self.successor_ino == 0
            && self.lower_path.is_none()
            && self.redirect_layer == 0
            && !self.named_elsewhere
            && self.detached.is_none()
            && self.kept.is_none()
            && self.moving.is_empty()
            && self.aliases.is_empty()
            && self.data.is_none()
            && !self.kernel_meta
            && self.kernel_redirect.is_none()
            && !self.impure
            && !self.indexed
    }
}

impl std::ops::Deref for NodeState {
    type Target = Rare;
    fn deref(&self) -> &Rare {
        static NONE: Rare = Rare::NONE;
        self.rare.as_deref().unwrap_or(&NONE)
    }
}

impl std::ops::DerefMut for NodeState {
    fn deref_mut(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(|| Box::new(Rare::NONE))
    }
}

/// The data of a metadata-only copy: a regular file in a lower layer (which never changes,
/// so this is fixed once found).
#[derive(Debug)]
pub struct DataSrc {
    pub at: DataAt,
    /// Where the file's topmost lower object is: the data's path, unless the data was reached
    /// through lower metadata-only copies and their redirects. What a redirect of ours names,
    /// as the kernel's does (it records that object as the copy's origin and follows the
    /// chain).
    pub first_lower: Vec<OsString>,
    /// The layer holding that object.
    pub first_layer: usize,
    /// Its fs-verity digest checked (`verity=`), once per data source.
    pub verified: std::sync::atomic::AtomicBool,
}

#[derive(Debug)]
pub enum DataAt {
    /// A regular file of lower layer `layer`, `path` from its root; `blocks` its st_blocks
    /// (what the union reports, as the kernel does).
    File {
        layer: usize,
        path: Vec<OsString>,
        blocks: i64,
    },
    /// An absolute redirect (raw) into the data-only layers, looked up at the first open or
    /// copy-up, as the kernel defers it (`Union::data_source`).
    Deferred(Vec<u8>),
}

impl DataSrc {
    /// Data at `at`, reached from the topmost lower object `first_lower` of `first_layer`.
    pub fn new(at: DataAt, first_lower: Vec<OsString>, first_layer: usize) -> Arc<DataSrc> {
        Arc::new(DataSrc {
            at,
            first_lower,
            first_layer,
            verified: Default::default(),
        })
    }

    /// The layer holding the data, once known.
    pub fn layer(&self) -> Option<usize> {
        match self.at {
            DataAt::File { layer, .. } => Some(layer),
            DataAt::Deferred(_) => None,
        }
    }
}

impl NodeState {
    pub fn new(parent: u64, name: &OsStr, layers: impl Into<Layers>) -> NodeState {
        NodeState {
            parent,
            name: Arc::from(name),
            layers: layers.into(),
            rare: None,
        }
    }

    /// Take where the object lives now from `now` (a fresh resolve of it), keeping this
    /// node's names and what its removals left (see `Union::lookup`, a copy-up it missed).
    pub fn relocate(&mut self, now: NodeState) {
        self.layers = now.layers.clone();
        self.lower_path = now.lower_path.clone();
        self.redirect_layer = now.redirect_layer;
        self.data = now.data.clone();
        self.impure = now.impure;
        self.indexed = now.indexed;
        self.kernel_meta = now.kernel_meta;
        self.kernel_redirect = now.kernel_redirect.clone();
        self.shrink();
    }

    /// Give back the box of rare fields if writes left them all unset.
    pub fn shrink(&mut self) {
        if self.rare.as_ref().is_some_and(|r| r.is_none()) {
            self.rare = None;
        }
    }

    /// Every (parent, name) this node is known under.
    pub fn names(&self) -> impl Iterator<Item = (u64, &OsStr)> {
        std::iter::once((self.parent, &*self.name))
            .chain(self.aliases.iter().map(|(p, n)| (*p, &**n)))
    }

    /// The layer a read of this node's data is served from: its top one, or for a
    /// metadata-only copy the layer holding its data.
    pub fn read_layer(&self) -> usize {
        self.data
            .as_ref()
            .and_then(|d| d.layer())
            .unwrap_or(self.layers[0])
    }

    /// Every (parent, name) this node is known under, the names shared.
    pub fn named(&self) -> impl Iterator<Item = (u64, Arc<OsStr>)> + '_ {
        std::iter::once((self.parent, self.name.clone()))
            .chain(self.aliases.iter().map(|(p, n)| (*p, n.clone())))
    }

    /// Drop one name; the next alias becomes the primary. True when no name is left.
    pub fn remove_name(&mut self, parent: u64, name: &OsStr) -> bool {
        if self.parent == parent && &*self.name == name {
            if self.aliases.is_empty() {
                return true;
            }
            let (p, n) = self.aliases.remove(0);
            self.parent = p;
            self.name = n;
        } else if !self.aliases.is_empty() {
            self.aliases
                .retain(|(p, n)| !(*p == parent && &**n == name));
        }
        false
    }

    /// Rename one of the node's names; the new name as stored (for the index).
    pub fn move_name(&mut self, parent: u64, name: &OsStr, np: u64, nn: &OsStr) -> Arc<OsStr> {
        let new: Arc<OsStr> = Arc::from(nn);
        if self.parent == parent && &*self.name == name {
            self.parent = np;
            self.name = new.clone();
        } else if let Some(a) = self
            .aliases
            .iter_mut()
            .find(|(p, n)| *p == parent && &**n == name)
        {
            *a = (np, new.clone());
        }
        new
    }
}

pub struct Node {
    pub id: u64,
    pub kind: Kind,
    /// The st_ino reported: the node id itself, except for the root (whose id FUSE fixes at 1).
    st_ino: u64,
    lookups: AtomicU64,
    pub state: RwLock<NodeState>,
    /// Serialises changes to this directory's entries; lookups and readdir take it shared.
    /// A non-directory has no entries: its lock is the object lock (`reach`).
    pub dir_lock: RwLock<()>,
    /// Serialises copy-up of this node so concurrent first writes copy it up once.
    pub copy_lock: Mutex<()>,
    /// Its names went to a successor (see `NodeTable::reissue`); it only serves what the
    /// kernel still holds open, and is never handed out by a lookup again.
    retired: AtomicBool,
}

impl Node {
    pub fn new(id: u64, kind: Kind, st_ino: u64, state: NodeState) -> Node {
        Node {
            id,
            kind,
            st_ino,
            lookups: AtomicU64::new(0),
            state: RwLock::new(state),
            dir_lock: RwLock::new(()),
            copy_lock: Mutex::new(()),
            retired: AtomicBool::new(false),
        }
    }

    /// For a non-directory: held by a request that reaches the object by a name, from
    /// reading the name to its last call by it. A rename or unlink about to change what the
    /// name leads to pins the object's fd first, then waits for these (`await_reachers`): a
    /// request never resolves the name before the change and uses it after (it would stat,
    /// open or chmod the file put in its place; test
    /// `write_path::a_file_being_replaced_answers_as_itself`). Directories are reached by
    /// fd. Never taken twice by one thread: a writer waiting between would deadlock them.
    pub fn reach(&self) -> Option<RwLockReadGuard<'_, ()>> {
        (!self.is_dir()).then(|| self.dir_lock.read().expect("object lock"))
    }

    /// Wait until no request holds `reach` (those coming later see the pinned fd).
    pub fn await_reachers(&self) {
        if !self.is_dir() {
            drop(self.dir_lock.write().expect("object lock"));
        }
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// For a retired node, the natural id of its object now (see `NodeTable::live`).
    pub fn successor_ino(&self) -> Option<u64> {
        Some(self.state.read().expect("node state lock").successor_ino).filter(|&n| n != 0)
    }

    /// Neither retired nor removed from the union: new names of its object may join it.
    pub fn is_live(&self) -> bool {
        !self.is_retired() && !self.state.read().expect("node state lock").unlinked
    }

    /// Live, or removed from the union while its object still is in it (`named_elsewhere`):
    /// a lookup of the object may give this node's id.
    fn keeps_its_id(&self) -> bool {
        let s = self.state.read().expect("node state lock");
        !self.is_retired() && (!s.unlinked || s.named_elsewhere)
    }

    pub fn st_ino(&self) -> u64 {
        self.st_ino
    }

    pub fn state(&self) -> NodeState {
        self.state.read().expect("node state lock").clone()
    }

    pub fn top_layer(&self) -> usize {
        self.state.read().expect("node state lock").layers[0]
    }

    pub fn is_dir(&self) -> bool {
        self.kind == Kind::Dir
    }
}

type Table = RwLock<Nodes>;

/// One shard of the id -> node map. The id is the node's own (`Node::id`, fixed once the
/// node is shared), so a slot holds the node alone: 8 bytes, not 16 for the pair.
#[derive(Default)]
struct Nodes {
    slots: hashbrown::HashTable<Arc<Node>>,
    hasher: std::hash::RandomState,
}

impl Nodes {
    fn hash(&self, id: u64) -> u64 {
        self.hasher.hash_one(id)
    }

    fn get(&self, id: &u64) -> Option<&Arc<Node>> {
        self.slots.find(self.hash(*id), |n| n.id == *id)
    }

    /// Put `node` under `id` (its own id), in place of whatever was there.
    fn insert(&mut self, id: u64, node: Arc<Node>) {
        debug_assert_eq!(id, node.id);
        let h = self.hash(id);
        match self.slots.find_mut(h, |n| n.id == id) {
            Some(slot) => *slot = node,
            None => {
                let hasher = &self.hasher;
                self.slots.insert_unique(h, node, |n| hasher.hash_one(n.id));
            }
        }
    }

    fn remove(&mut self, id: &u64) -> Option<Arc<Node>> {
        let h = self.hash(*id);
        self.slots
            .find_entry(h, |n| n.id == *id)
            .ok()
            .map(|e| e.remove().0)
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn capacity(&self) -> usize {
        self.slots.capacity()
    }

    fn shrink_to(&mut self, keep: usize) {
        let hasher = &self.hasher;
        self.slots.shrink_to(keep, |n| hasher.hash_one(n.id));
    }
}
type Index = Mutex<hashbrown::HashMap<IndexKey, u64, std::hash::RandomState>>;

/// A (parent, name) of the index. The name is the node state's own (`NodeState::name`, an
/// alias): a name is held once however many maps know it, and a lookup asks with a borrowed
/// `Named` (no allocation per request).
#[derive(PartialEq, Eq)]
struct IndexKey {
    parent: u64,
    name: Arc<OsStr>,
}

/// A borrowed (parent, name): hashes as the `IndexKey` it equals.
#[derive(Clone, Copy)]
struct Named<'a>(u64, &'a OsStr);

impl Hash for IndexKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        Named(self.parent, &self.name).hash(h)
    }
}

impl Hash for Named<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.hash(h);
    }
}

impl hashbrown::Equivalent<IndexKey> for Named<'_> {
    fn equivalent(&self, k: &IndexKey) -> bool {
        self.0 == k.parent && self.1 == &*k.name
    }
}

pub struct NodeTable {
    table: Vec<Table>,
    index: Vec<Index>,
    /// Ids for reissued nodes, outside the inode numbers real filesystems hand out.
    next_reissued: AtomicU64,
    /// Natural id (st_ino) -> the fresh id its object was given because a removed object the
    /// kernel still holds was registered under that number (see `id_for`).
    moved: Mutex<HashMap<u64, u64>>,
    /// Entries in `moved`: while none, `id_for` takes no lock.
    moved_len: AtomicUsize,
}

const REISSUED_BASE: u64 = 1 << 62;

/// A shard's map holds far fewer entries than it has room for (the kernel forgot most of
/// its inodes): it gives the room back, keeping twice what is left. Maps never shrink by
/// themselves, and after a walk of 300k files the two of them held 24 MiB.
fn sparse(len: usize, capacity: usize) -> bool {
    capacity > 1024 && len * 8 < capacity
}

/// What `NodeTable::insert` did.
pub enum Inserted {
    /// (parent, name) already named this node.
    Existing(Arc<Node>),
    New(Arc<Node>),
    /// A further name of a live hard-linked node.
    Alias(Arc<Node>),
    /// An id that belonged to a removed object now names this one.
    Revived(Arc<Node>),
}

impl Inserted {
    pub fn node(&self) -> &Arc<Node> {
        match self {
            Inserted::Existing(n)
            | Inserted::New(n)
            | Inserted::Alias(n)
            | Inserted::Revived(n) => n,
        }
    }
}

fn index_shard(parent: u64, name: &OsStr) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    name.hash(&mut h);
    (h.finish() as usize) % SHARDS
}

impl Default for NodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeTable {
    pub fn new() -> NodeTable {
        NodeTable {
            table: (0..SHARDS).map(|_| RwLock::default()).collect(),
            index: (0..SHARDS)
                .map(|_| Mutex::new(hashbrown::HashMap::with_hasher(Default::default())))
                .collect(),
            next_reissued: AtomicU64::new(REISSUED_BASE),
            moved: Mutex::new(HashMap::new()),
            moved_len: AtomicUsize::new(0),
        }
    }

    /// True for an id handed out in place of an inode number (its st_ino differs).
    pub fn is_reissued(id: u64) -> bool {
        id >= REISSUED_BASE
    }

    /// The node id for an object whose inode number (natural id) is `natural`: that number,
    /// unless the node under it is a removed object the kernel still holds (an unlinked file
    /// still open, a removed directory pinned by an open file in it) or a retired one. The
    /// kernel would take a reply with that id for its old inode (a dead directory lists
    /// ENOENT: soak seed 23029), so the new object gets a fresh id, the same one for each of
    /// its names while it lives.
    pub fn id_for(&self, natural: u64) -> u64 {
        // Nearly always: nothing moved, the number free or live. No lookup waits on a lock.
        if self.moved_len.load(Ordering::Acquire) == 0
            && self.get(natural).is_none_or(|n| n.keeps_its_id())
        {
            return natural;
        }
        let mut moved = self.moved.lock().expect("moved lock");
        if let Some(&f) = moved.get(&natural) {
            if self.get(f).is_some_and(|n| n.keeps_its_id()) {
                return f;
            }
            moved.remove(&natural);
        }
        let id = match self.get(natural) {
            Some(n) if !n.keeps_its_id() => {
                let f = self.next_reissued.fetch_add(1, Ordering::Relaxed);
                moved.insert(natural, f);
                f
            }
            _ => natural,
        };
        self.moved_len.store(moved.len(), Ordering::Release);
        id
    }

    /// The live node of the object whose inode number is `natural`, if any.
    pub fn live(&self, natural: u64) -> Option<Arc<Node>> {
        let id = if self.moved_len.load(Ordering::Acquire) == 0 {
            natural
        } else {
            let moved = self.moved.lock().expect("moved lock");
            moved.get(&natural).copied().unwrap_or(natural)
        };
        self.get(id).filter(|n| n.is_live())
    }

    fn shard(&self, id: u64) -> &Table {
        &self.table[(id as usize) % SHARDS]
    }

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.shard(id).read().expect("table lock").get(&id).cloned()
    }

    pub fn insert_root(&self, node: Node) {
        node.lookups.store(1, Ordering::Relaxed);
        self.shard(node.id)
            .write()
            .expect("table lock")
            .insert(node.id, Arc::new(node));
    }

    /// The node already known for (parent, name), with its lookup count raised by one.
    pub fn lookup_existing(&self, parent: u64, name: &OsStr) -> Option<Arc<Node>> {
        let idx = self.index[index_shard(parent, name)]
            .lock()
            .expect("index lock");
        let id = *idx.get(&Named(parent, name))?;
        self.pin(id)
    }

    /// Raise the lookup count of a live node (under its table shard lock, so forget can't race).
    fn pin(&self, id: u64) -> Option<Arc<Node>> {
        let t = self.shard(id).write().expect("table lock");
        let n = t.get(&id)?;
        n.lookups.fetch_add(1, Ordering::Relaxed);
        Some(n.clone())
    }

    /// Register `node` under its (parent, name) with one more lookup. Node ids are inode
    /// numbers, so the id may be known already: another name of a hard link (the name becomes
    /// an alias), or a number reused after an unlink (the node is revived in place).
    pub fn insert(&self, node: Node) -> Inserted {
        self.place(node, false)
            .expect("an insert always places its node")
    }

    /// Register `node` as a further name of the live node with its id, as `insert`; or, if
    /// no such node is left (forgotten, retired, or removed from the union since the caller
    /// saw it), register nothing and return None.
    pub fn join(&self, node: Node) -> Option<Inserted> {
        self.place(node, true)
    }

    fn place(&self, mut node: Node, join: bool) -> Option<Inserted> {
        let (parent, name, lower) = {
            let s = node.state.read().expect("node state lock");
            (s.parent, s.name.clone(), s.layers[0] != 0)
        };
        let mut idx = self.index[index_shard(parent, &name)]
            .lock()
            .expect("index lock");
        if let Some(&id) = idx.get(&Named(parent, &name))
            && id == node.id
            && let Some(n) = self.pin(id)
        {
            return Some(Inserted::Existing(n));
        }
        let mut id = node.id;
        let mut stale: Vec<(u64, Arc<OsStr>)> = Vec::new();
        let mut t = self.shard(id).write().expect("table lock");
        if t.get(&id).is_some_and(|n| n.is_retired()) {
            if join {
                return None;
            }
            // The kernel still holds the retired node under this number: a new one.
            drop(t);
            id = self.next_reissued.fetch_add(1, Ordering::Relaxed);
            node.id = id;
            t = self.shard(id).write().expect("table lock");
        }
        let result = match t.get(&id) {
            Some(old) if old.kind == node.kind => {
                let mut os = old.state.write().expect("node state lock");
                // (Under its state lock, so no removal of its last name comes in between.)
                // Nor a lower name of a node showing its copy: its copy-up linked up only
                // the names it had (the lookup links this one up from the index instead).
                if join && (os.unlinked || (lower && os.layers[0] == 0)) {
                    return None;
                }
                old.lookups.fetch_add(1, Ordering::Relaxed);
                let new_state = node.state.into_inner().expect("node state lock");
                if os.unlinked || old.is_dir() {
                    stale = os.named().collect();
                    *os = new_state;
                    drop(os);
                    Inserted::Revived(old.clone())
                } else {
                    if !os.names().any(|(p, n)| p == parent && n == &*name) {
                        os.aliases.push((parent, name.clone()));
                    }
                    drop(os);
                    Inserted::Alias(old.clone())
                }
            }
            _ if join => return None,
            Some(old) => {
                // Same number, other type: a reused inode; the kernel drops the old one.
                stale = old.state().named().collect();
                let lookups = old.lookups.load(Ordering::Relaxed);
                node.lookups.store(lookups + 1, Ordering::Relaxed);
                let arc = Arc::new(node);
                t.insert(id, arc.clone());
                Inserted::Revived(arc)
            }
            None => {
                node.lookups.store(1, Ordering::Relaxed);
                let arc = Arc::new(node);
                t.insert(id, arc.clone());
                Inserted::New(arc)
            }
        };
        drop(t);
        let name = match &result {
            // The key shares the name the node keeps (its state may be the one just taken).
            Inserted::Alias(n) | Inserted::Revived(n) => n
                .state
                .read()
                .expect("node state lock")
                .named()
                .find(|(p, n)| *p == parent && **n == *name)
                .map_or(name, |(_, n)| n),
            _ => name,
        };
        idx.insert(
            IndexKey {
                parent,
                name: name.clone(),
            },
            id,
        );
        drop(idx);
        for (p, n) in stale {
            if (p, &*n) != (parent, &*name) {
                self.unindex_if(p, &n, id);
            }
        }
        Some(result)
    }

    /// Give every name of `old` to a new node (a new FUSE node id, so a new kernel inode) with
    /// the same state, and retire `old`. The kernel binds an inode to one backing file while
    /// passthrough opens of it exist: a reader of a lower file still open after a copy-up keeps
    /// the old inode, later opens get the new one. Its id is `natural` (what a fresh lookup
    /// would give it) unless that is taken. FUSE node ids are st_ino, so the new node shows
    /// that number. None if `old` was already retired (its successor is in place).
    pub fn reissue(&self, old: &Node, natural: u64) -> Option<Arc<Node>> {
        if old.retired.swap(true, Ordering::Relaxed) {
            return None;
        }
        let id = match self.id_for(natural) {
            id if id == 0 || self.get(id).is_some() => {
                self.next_reissued.fetch_add(1, Ordering::Relaxed)
            }
            id => id,
        };
        let mut state = old.state();
        // (A rename or unlink under way clears its own node's fd, not this one's.)
        if !state.moving.is_empty() {
            state.moving.clear();
        }
        let names: Vec<(u64, Arc<OsStr>)> = state.named().collect();
        let node = Arc::new(Node::new(id, old.kind, natural, state));
        // (Not the new id: the kernel may forget that node, and a later lookup makes another.)
        old.state.write().expect("node state lock").successor_ino = natural;
        self.shard(id)
            .write()
            .expect("table lock")
            .insert(id, node.clone());
        for (p, n) in names {
            let mut idx = self.index[index_shard(p, &n)].lock().expect("index lock");
            if let Some(v) = idx.get_mut(&Named(p, &n))
                && *v == old.id
            {
                *v = id;
            }
        }
        Some(node)
    }

    /// Drop `n` lookups; the node leaves the table at zero.
    pub fn forget(&self, id: u64, n: u64) -> bool {
        if id == ROOT_ID {
            return false;
        }
        let removed = {
            let mut t = self.shard(id).write().expect("table lock");
            let Some(node) = t.get(&id) else { return false };
            // The shard's write lock orders this against `pin`.
            let left = node.lookups.load(Ordering::Relaxed).saturating_sub(n);
            node.lookups.store(left, Ordering::Relaxed);
            if left == 0 {
                let node = t.remove(&id);
                if sparse(t.len(), t.capacity()) {
                    let keep = t.len() * 2;
                    t.shrink_to(keep);
                }
                node
            } else {
                None
            }
        };
        match removed {
            Some(node) => {
                let s = node.state();
                for (p, name) in s.names() {
                    self.unindex_if(p, name, id);
                }
                if id != node.st_ino {
                    let mut moved = self.moved.lock().expect("moved lock");
                    if moved.get(&node.st_ino) == Some(&id) {
                        moved.remove(&node.st_ino);
                        self.moved_len.store(moved.len(), Ordering::Release);
                    }
                }
                true
            }
            None => false,
        }
    }

    /// Drop `names` from `node` and from the name index: names the kernel knows no more, or
    /// one never linked up. The node's last name stays (`NodeState::remove_name`), and so
    /// does its index entry (`unindex_if` leaves a name the node still claims).
    pub fn drop_names<N: AsRef<OsStr>>(&self, node: &Node, names: &[(u64, N)]) {
        let mut s = node.state.write().expect("node state lock");
        for (p, n) in names {
            s.remove_name(*p, n.as_ref());
        }
        drop(s);
        for (p, n) in names {
            self.unindex_if(*p, n.as_ref(), node.id);
        }
    }

    /// Remove the (parent, name) entry if it still names `id`.
    pub fn unindex_if(&self, parent: u64, name: &OsStr, id: u64) {
        let mut idx = self.index[index_shard(parent, name)]
            .lock()
            .expect("index lock");
        let key = Named(parent, name);
        // Unless the node in the table under this id claims the name: ids are inode numbers,
        // so a FORGET of one node and the lookup of a new one of the same file (served at
        // once) would else drop the new node's entry, and a later unlink or rename of the
        // name, not finding it, would leave the node claiming a name that is gone (engine
        // test `races`). Under the index lock, before the table's and the node's (the order
        // `insert` takes them in).
        let claimed = || {
            self.shard(id)
                .read()
                .expect("table lock")
                .get(&id)
                .is_some_and(|n| {
                    // (An unlinked node keeps its last name, but claims it no more.)
                    let s = n.state.read().expect("node state lock");
                    !s.unlinked && s.names().any(|(p, m)| p == parent && m == name)
                })
        };
        if idx.get(&key) == Some(&id) && !claimed() {
            idx.remove(&key);
            if sparse(idx.len(), idx.capacity()) {
                let keep = idx.len() * 2;
                idx.shrink_to(keep);
            }
        }
    }

    /// The node id registered for (parent, name), without pinning it.
    pub fn peek(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let idx = self.index[index_shard(parent, name)]
            .lock()
            .expect("index lock");
        idx.get(&Named(parent, name)).copied()
    }

    /// Move an index entry (rename): (parent, name) -> (new_parent, new_name), the name as the
    /// node stores it (`NodeState::move_name`).
    pub fn reindex(
        &self,
        id: u64,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: Arc<OsStr>,
    ) {
        self.unindex_if(parent, name, id);
        let mut idx = self.index[index_shard(new_parent, &new_name)]
            .lock()
            .expect("index lock");
        idx.insert(
            IndexKey {
                parent: new_parent,
                name: new_name,
            },
            id,
        );
    }

    pub fn len(&self) -> usize {
        self.table
            .iter()
            .map(|t| t.read().expect("table lock").len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
