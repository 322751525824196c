# Reactors: one thread per core, pinned, running reactor_run() without the GIL.  A pass polls the
# mailbox, every queue, and the I/O engine, then sends the interrupts the pass earned (one per
# queue at most).  After an idle spell the reactor asks the drivers for kicks and sleeps in
# epoll_wait on the kick eventfds, its mailbox doorbell and the io_uring completion eventfd.
#
# The control plane talks to a reactor only through its mailbox: it posts a message and waits for
# `done` (signalled on ack_fd, which asyncio watches).  Queues are added and removed that way, so
# the control plane never frees or unmaps what a reactor may still touch.

from libc.errno cimport ENOSPC

cdef extern from "<pthread.h>" nogil:
    int pthread_mutex_init(pthread_mutex_t *m, void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t "epoll_data":
        void *ptr
        int fd
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    int EPOLLIN
    int EPOLL_CLOEXEC

cdef enum:
    POLL_BUDGET = 64          # requests popped per queue per pass
    EPOLL_BATCH = 64
    WAKE_TAG = 1              # epoll data of the mailbox doorbell
    IO_TAG = 2                # epoll data of the io_uring completion eventfd


cdef void _ack(reactor_t *r, mailbox_msg_t *msg, int32_t result) noexcept nogil:
    msg.result = result
    vhd_store_u32(&msg.done, 1)
    eventfd_signal(r.ack_fd)


cdef inline void _epoll_watch(reactor_t *r, int fd, uint64_t tag) noexcept nogil:
    cdef epoll_event ev
    if fd >= 0:
        ev.events = EPOLLIN
        ev.data.u64 = tag
        epoll_ctl(r.epoll_fd, EPOLL_CTL_ADD, fd, &ev)


cdef inline void _epoll_unwatch(reactor_t *r, int fd) noexcept nogil:
    cdef epoll_event ev
    if fd >= 0:
        epoll_ctl(r.epoll_fd, EPOLL_CTL_DEL, fd, &ev)


cdef int32_t _add_queue(reactor_t *r, vq_t *vq) noexcept nogil:
    if r.nqueues >= MAX_REACTOR_QUEUES:
        return -ENOSPC
    vq.io = &r.io
    vq.stopping = 0
    r.queues[r.nqueues] = vq
    r.nqueues += 1
    _epoll_watch(r, vq.kick_fd, <uint64_t>vq)
    vq_disable_kicks(vq)
    # Signal once at start: a driver that missed an interrupt across a reconnect resumes.
    eventfd_signal(vq.call_fd)
    return 0


cdef void _detach_queue(reactor_t *r, vq_t *vq) noexcept nogil:
    cdef uint32_t i
    if vq_notify_now(vq, vhd_ticks()):     # the last completions' interrupt, uncoalesced
        r.stats.notifications += 1
    _epoll_unwatch(r, vq.kick_fd)
    for i in range(r.nqueues):
        if r.queues[i] == vq:
            r.queues[i] = r.queues[r.nqueues - 1]
            r.nqueues -= 1
            break
    vq.io = NULL


cdef int _process_mailbox(reactor_t *r) noexcept nogil:
    cdef mailbox_msg_t *msg
    cdef int handled = 0
    cdef int old_fd
    pthread_mutex_lock(r.lock)
    while r.inbox_head != r.inbox_tail:
        msg = r.inbox[r.inbox_head % MAILBOX_SIZE]
        r.inbox_head += 1
        pthread_mutex_unlock(r.lock)
        handled += 1
        if msg.op == MB_ADD_QUEUE:
            _ack(r, msg, _add_queue(r, msg.vq))
        elif msg.op == MB_REMOVE_QUEUE:
            msg.vq.stopping = 1
            msg.next_pending = r.draining
            r.draining = msg
        elif msg.op == MB_SET_FDS:
            msg.vq.call_fd = msg.fd
            msg.vq.err_fd = msg.fd2
            _ack(r, msg, 0)
        elif msg.op == MB_CALL:
            _ack(r, msg, msg.fn(msg.arg))
        elif msg.op == MB_STOP:
            r.stop = 1
            _ack(r, msg, 0)
        else:
            _ack(r, msg, 0)
        pthread_mutex_lock(r.lock)
    pthread_mutex_unlock(r.lock)
    return handled


cdef int _finish_drains(reactor_t *r) noexcept nogil:
    """Complete REMOVE_QUEUE messages whose queue has no request in flight any more."""
    cdef mailbox_msg_t *msg = r.draining
    cdef mailbox_msg_t *keep = NULL
    cdef mailbox_msg_t *nxt
    cdef int finished = 0
    while msg != NULL:
        nxt = msg.next_pending
        if msg.vq.inflight_count == 0:
            _detach_queue(r, msg.vq)
            _ack(r, msg, 0)
            finished += 1
        else:
            msg.next_pending = keep
            keep = msg
        msg = nxt
    r.draining = keep
    return finished


cdef bint _try_sleep(reactor_t *r) noexcept nogil:
    """Ask for kicks on every queue and sleep until one arrives (or mail, or I/O completes).
    Returns False without sleeping if work showed up or sleeping is not possible."""
    cdef uint32_t i
    cdef int n, k, timeout_ms
    cdef vq_t *vq
    cdef epoll_event events[EPOLL_BATCH]
    cdef uint64_t t0
    if r.io.unsubmitted or r.draining != NULL:
        return False
    for i in range(r.io.nvqueues):
        if r.io.vqueues[i].inflight:
            return False      # completions from another target are polled, not signalled
    for i in range(r.nqueues):
        vq = r.queues[i]
        if vq.kick_fd < 0 and not vq.broken:
            return False      # a driver that never kicks must be polled
        if vq_notify_now(vq, vhd_ticks()):     # no interrupt waits for coalescing while we sleep
            r.stats.notifications += 1
    for i in range(r.nqueues):
        if vq_enable_kicks(r.queues[i]):
            for k in range(i + 1):
                vq_disable_kicks(r.queues[k])
            return False
    # QoS-queued I/O needs a retry at the next timeslice; otherwise sleep until woken.
    timeout_ms = 1 if r.io.queued_head != NULL else -1
    r.stats.sleeps += 1
    t0 = vhd_ticks()
    vhd_store_u64(&r.sleeping_since, t0)
    n = epoll_wait(r.epoll_fd, events, EPOLL_BATCH, timeout_ms)
    # Cleared before idle_ticks grows: a reader that sees both values of one sleep adds it once.
    vhd_store_u64(&r.sleeping_since, 0)
    vhd_store_u64(&r.stats.idle_ticks, r.stats.idle_ticks + vhd_ticks() - t0)
    r.stats.wakeups += 1
    for k in range(n if n > 0 else 0):
        if events[k].data.u64 == WAKE_TAG:
            eventfd_drain(r.wake_fd)
        elif events[k].data.u64 == IO_TAG:
            eventfd_drain(r.io.event_fd)
        else:
            vq = <vq_t *>events[k].data.ptr
            eventfd_drain(vq.kick_fd)
            vq.stats.kicks += 1
    for i in range(r.nqueues):
        vq_disable_kicks(r.queues[i])
    return True


cdef void reactor_run(reactor_t *r) noexcept nogil:
    """The reactor loop; returns after an MB_STOP message."""
    cdef uint64_t now, start, last_work
    cdef uint32_t i
    cdef int work, notified
    cdef vq_t *vq
    vhd_store_u32(&r.thread_alive, 1)
    vhd_clock_cache(1)
    last_work = vhd_ticks()
    while not r.stop:
        start = vhd_clock_refresh()
        work = 0
        if vhd_load_u32(&r.inbox_tail) != r.inbox_head:
            work += _process_mailbox(r)
        for i in range(r.nqueues):
            work += vq_poll(r.queues[i], POLL_BUDGET)
        work += io_ctx_poll(&r.io)
        now = vhd_ticks()
        for i in range(r.nqueues):
            vq = r.queues[i]
            if vq.need_notify:
                notified = vq_notify(vq, now)
                if notified > 0:
                    r.stats.notifications += 1
                elif notified < 0:
                    r.stats.coalesced += 1
        if r.draining != NULL:
            work += _finish_drains(r)
        r.stats.poll_passes += 1
        now = vhd_ticks()
        if work:
            r.stats.busy_ticks += now - start
            last_work = now
        else:
            r.stats.idle_ticks += now - start
            if now - last_work > r.idle_sleep_ticks:
                _try_sleep(r)
                last_work = vhd_ticks()
    vhd_store_u32(&r.thread_alive, 0)


cdef class MailboxMessage:
    """A message posted to a reactor, alive until the reactor has acknowledged it."""
    cdef mailbox_msg_t *msg
    cdef readonly object payload     # Python objects the reactor may touch until done
    cdef public object future        # set by the control plane's waiter

    def __cinit__(self):
        self.msg = <mailbox_msg_t *>calloc(1, sizeof(mailbox_msg_t))
        if self.msg == NULL:
            raise MemoryError()

    @property
    def done(self):
        return bool(vhd_load_u32(&self.msg.done))

    @property
    def result(self):
        return self.msg.result

    def __dealloc__(self):
        free(self.msg)


cdef class Reactor:
    """One data-plane thread pinned to a core.

    start() launches the thread; post_*() queue work on its mailbox and return a MailboxMessage
    whose `done` turns true when the reactor has carried it out (ack_fd becomes readable).
    """
    cdef reactor_t *r
    cdef object thread
    cdef readonly int lcore
    cdef readonly object tid
    cdef public object pin_error
    cdef set queues                   # VirtQueue objects attached (kept alive)
    cdef list unacked                 # posted messages the reactor may still write to

    def __cinit__(self, int lcore, double idle_sleep_us=200.0):
        cdef int rc
        self.lcore = lcore
        self.queues = set()
        self.unacked = []
        self.r = <reactor_t *>calloc(1, sizeof(reactor_t))
        if self.r == NULL:
            raise MemoryError()
        self.r.lcore = lcore
        self.r.epoll_fd = self.r.wake_fd = self.r.ack_fd = -1
        self.r.lock = <pthread_mutex_t *>malloc(sizeof(pthread_mutex_t))
        if self.r.lock == NULL:
            raise MemoryError()
        pthread_mutex_init(self.r.lock, NULL)
        self.r.epoll_fd = epoll_create1(EPOLL_CLOEXEC)
        self.r.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.r.ack_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.r.epoll_fd < 0 or self.r.wake_fd < 0 or self.r.ack_fd < 0:
            raise OSError(errno, os.strerror(errno))
        rc = io_ctx_init(&self.r.io)
        if rc < 0:
            raise OSError(-rc, "io_uring setup failed: " + os.strerror(-rc))
        _epoll_watch(self.r, self.r.wake_fd, WAKE_TAG)
        _epoll_watch(self.r, self.r.io.event_fd, IO_TAG)
        self.r.idle_sleep_ticks = <uint64_t>(idle_sleep_us * tick_rate() / 1e6)

    @property
    def ack_fd(self):
        """Readable when a posted message is done (the control plane drains it)."""
        return self.r.ack_fd

    @property
    def running(self):
        return self.thread is not None and bool(vhd_load_u32(&self.r.thread_alive) or not self.r.stop)

    @property
    def started(self):
        return self.thread is not None

    def start(self):
        """Launch the reactor thread, pinned to lcore."""
        import threading
        ready = threading.Event()
        self.thread = threading.Thread(target=self._thread_main, args=(ready,),
                                       name="reactor_%d" % self.lcore, daemon=True)
        self.thread.start()
        ready.wait()

    def _thread_main(self, ready):
        import threading
        self.tid = threading.get_native_id()
        try:
            os.sched_setaffinity(0, {self.lcore})
        except OSError as exc:
            self.pin_error = exc
        ready.set()
        with nogil:
            reactor_run(self.r)

    cdef MailboxMessage _post(self, uint32_t op, vq_t *vq, int fd, object payload, int fd2=-1,
                              reactor_fn_t fn=NULL, void *arg=NULL):
        cdef MailboxMessage m = MailboxMessage()
        m.msg.op = op
        m.msg.vq = vq
        m.msg.fd = fd
        m.msg.fd2 = fd2
        m.msg.fn = fn
        m.msg.arg = arg
        m.payload = payload
        with nogil:
            pthread_mutex_lock(self.r.lock)
        if self.r.inbox_tail - self.r.inbox_head >= MAILBOX_SIZE:
            pthread_mutex_unlock(self.r.lock)
            raise RuntimeError("reactor %d mailbox is full" % self.lcore)
        self.r.inbox[self.r.inbox_tail % MAILBOX_SIZE] = m.msg
        vhd_store_u32(&self.r.inbox_tail, self.r.inbox_tail + 1)
        pthread_mutex_unlock(self.r.lock)
        # The reactor writes to the message when it is done: keep it alive until then, whatever
        # the caller does with its reference.
        self.unacked = [msg for msg in self.unacked if not msg.done]
        self.unacked.append(m)
        eventfd_signal(self.r.wake_fd)
        return m

    def post_add_queue(self, VirtQueue queue):
        """Start polling queue (configured, device attached)."""
        if queue.vq.handler == NULL:
            raise ValueError("queue %d has no device attached" % queue.vq.index)
        self.queues.add(queue)
        return self._post(MB_ADD_QUEUE, queue.vq, -1, queue)

    def post_remove_queue(self, VirtQueue queue):
        """Stop fetching from queue, wait for its in-flight requests, stop polling it.  When done,
        queue.vring_base is what GET_VRING_BASE answers."""
        return self._post(MB_REMOVE_QUEUE, queue.vq, -1, queue)

    def forget_queue(self, VirtQueue queue):
        """Drop the reference kept on a queue once its removal is done."""
        self.queues.discard(queue)

    def post_set_fds(self, VirtQueue queue, int call_fd, int err_fd):
        """Switch a running queue's call and error eventfds (-1: none); the old ones may be
        closed once done."""
        return self._post(MB_SET_FDS, queue.vq, call_fd, queue, err_fd)

    def post_set_log(self, VirtQueue queue):
        """Switch a polled queue to its staged dirty-log settings (VirtQueue.set_log) between
        two passes, never in the middle of a request's completion."""
        return self._post(MB_CALL, queue.vq, -1, queue, -1, vq_apply_log, <void *>queue.vq)

    def post_barrier(self):
        """A message that is done once the reactor has processed everything posted before it."""
        return self._post(MB_BARRIER, NULL, -1, None)

    def post_stop(self):
        return self._post(MB_STOP, NULL, -1, None)

    def drain_acks(self):
        """Reset ack_fd after it became readable."""
        eventfd_drain(self.r.ack_fd)

    def join(self, timeout=None):
        """Wait for the thread to end; then drop it (it refers back to this reactor)."""
        if self.thread is not None:
            self.thread.join(timeout)
            if not self.thread.is_alive():
                self.thread = None

    def stats(self):
        """busy/idle ticks, poll passes, sleeps, wakeups, interrupts sent and held back by
        coalescing, attached queue count.  Idle time includes the current sleep so far."""
        cdef reactor_stats_t s = self.r.stats
        cdef uint64_t since, idle, now
        while True:
            since = vhd_load_u64(&self.r.sleeping_since)
            idle = vhd_load_u64(&self.r.stats.idle_ticks)
            if vhd_load_u64(&self.r.sleeping_since) == since:
                break
        now = vhd_ticks()
        if since and now > since:
            idle += now - since
        return {"busy_ticks": s.busy_ticks, "idle_ticks": idle,
                "poll_passes": s.poll_passes, "sleeps": s.sleeps, "wakeups": s.wakeups,
                "notifications": s.notifications, "coalesced": s.coalesced,
                "queues": self.r.nqueues}

    def __dealloc__(self):
        if self.r == NULL:
            return
        if vhd_load_u32(&self.r.thread_alive):
            # Never free what a running thread uses: leak instead (only at interpreter exit).
            return
        io_ctx_fini(&self.r.io)
        for fd in (self.r.epoll_fd, self.r.wake_fd, self.r.ack_fd):
            if fd >= 0:
                close(fd)
        if self.r.lock != NULL:
            pthread_mutex_destroy(self.r.lock)
            free(self.r.lock)
        free(self.r)
        self.r = NULL
