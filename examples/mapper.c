/*
 * mapper.c: a ramd mapper in plain C (libc only), as docs/protocol.md §8 describes one.
 *
 *   cc -std=c11 -Wall -Wextra -O2 -o mapper examples/mapper.c
 *   ./mapper SOCKET BLOCK-ID
 *
 * It connects to the daemon's JSON-RPC socket, asks for the fd of a shared block
 * (ram-block-get-fd: the fd comes as SCM_RIGHTS with the first byte of the answer), maps the
 * block with the daemon's layout (max-size reserved PROT_NONE, [0, size) mapped MAP_SHARED
 * from the fd), writes a pattern into it, then follows the block's events, which reach a
 * mapper without subscribe:
 *
 * - RAM_BLOCK_RESIZED growing the block: map the new tail, check the old contents, fill it;
 * - RAM_BLOCK_RESIZED shrinking it ("ack": true): stop touching the tail, replace its
 *   mapping by an inaccessible reservation, then send ram-block-ack with the event's seq (the
 *   daemon releases the tail only after that, so nothing here ever gets SIGBUS);
 * - RAM_BLOCK_REMOVED ("ack": true): unmap everything, close the fd, acknowledge, and exit 0
 *   once the daemon answered the acknowledgement.
 *
 * It prints one line per step on stdout. JSON is handled by string search, which is enough
 * for the daemon's compact output (no whitespace, keys as the protocol names them, block ids
 * without quotes or backslashes); a real client would use a JSON parser.
 *
 * Exit status: 0 after the block was removed, 1 on any error (printed on stderr), 2 usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* The daemon's answers and events are small; an answer longer than this is an error here. */
#define MAX_LINE (1 << 20)

struct conn {
    int sock;
    char *buf;   /* bytes received, not yet returned as lines */
    size_t len;
    int fd;      /* the fd that came with the ram-block-get-fd answer, or -1 */
};

struct block {
    char id[80];
    unsigned char *base; /* the reservation: max_size bytes */
    uint64_t size, max_size, page_size;
    int fd;
};

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("mapper: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

/* -- the connection ------------------------------------------------------------------------- */

static void conn_open(struct conn *c, const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof(addr.sun_path))
        die("socket path too long: %s", path);
    strcpy(addr.sun_path, path);
    c->sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->sock < 0 || connect(c->sock, (struct sockaddr *)&addr, sizeof(addr)) < 0)
        die("cannot connect to %s: %s", path, strerror(errno));
    c->buf = malloc(MAX_LINE + 1);
    if (c->buf == NULL)
        die("out of memory");
    c->len = 0;
    c->fd = -1;
}

/* Send one request: a compact JSON text and a newline (the newline is optional for ramd). */
static void conn_send(struct conn *c, const char *fmt, ...)
{
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(text, sizeof(text) - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof(text) - 1)
        die("request too long");
    text[n++] = '\n';
    for (int off = 0; off < n;) {
        ssize_t w = send(c->sock, text + off, (size_t)(n - off), MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            die("send: %s", strerror(errno));
        off += (int)w;
    }
}

/* Receive more bytes; keep the fds that come with them (SCM_RIGHTS). False at EOF. */
static int conn_fill(struct conn *c)
{
    if (c->len >= MAX_LINE)
        die("a message longer than %d bytes", MAX_LINE);
    union {
        struct cmsghdr hdr;
        char space[CMSG_SPACE(4 * sizeof(int))];
    } control;
    struct iovec iov = {.iov_base = c->buf + c->len, .iov_len = MAX_LINE - c->len};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.space,
        .msg_controllen = sizeof(control.space),
    };
    ssize_t n;
    do
        n = recvmsg(c->sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        die("recvmsg: %s", strerror(errno));
    if (msg.msg_flags & MSG_CTRUNC)
        die("file descriptors were truncated");
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm != NULL; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
            if (c->fd < 0)
                c->fd = fd;
            else
                close(fd); /* only one fd was asked for */
        }
    }
    c->len += (size_t)n;
    return n > 0;
}

/* The next message (one line, without its newline, NUL-terminated; valid until the next
 * call), or NULL when the daemon closed the connection. */
static char *conn_line(struct conn *c, char *out, size_t out_size)
{
    char *nl;
    while ((nl = memchr(c->buf, '\n', c->len)) == NULL)
        if (!conn_fill(c))
            return NULL;
    size_t n = (size_t)(nl - c->buf);
    if (n >= out_size)
        die("a message longer than %zu bytes", out_size);
    memcpy(out, c->buf, n);
    out[n] = '\0';
    c->len -= n + 1;
    memmove(c->buf, nl + 1, c->len);
    return out;
}

/* -- minimal JSON by string search (the daemon's compact output) ----------------------------- */

/* The unsigned integer member "key" after `from`; die if it is missing. The pattern includes
 * the opening quote, so "size" never matches inside "max-size" or "new-size". */
static uint64_t json_u64(const char *from, const char *key)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "\"%s\":", key);
    const char *p = strstr(from, pattern);
    if (p == NULL)
        die("no \"%s\" in %s", key, from);
    p += strlen(pattern);
    char *end;
    errno = 0;
    uint64_t v = strtoull(p, &end, 10);
    if (end == p || errno != 0)
        die("bad \"%s\" in %s", key, from);
    return v;
}

/* The request id an answer ends with: `,"id":N}` (the last member of every answer). */
static long answer_id(const char *line)
{
    const char *p = strstr(line, "\"id\":"), *last = NULL;
    for (; p != NULL; p = strstr(p + 1, "\"id\":"))
        last = p;
    return last == NULL ? -1 : strtol(last + 5, NULL, 10);
}

static int is_event(const char *line, const char *name)
{
    char pattern[64];
    snprintf(pattern, sizeof(pattern), "{\"jsonrpc\":\"2.0\",\"method\":\"%s\",", name);
    return strncmp(line, pattern, strlen(pattern)) == 0;
}

/* The event's "data" object is about this block. */
static int about(const char *data, const struct block *b)
{
    char pattern[128];
    snprintf(pattern, sizeof(pattern), "\"id\":\"%s\",", b->id);
    return strstr(data, pattern) != NULL;
}

/* -- the mapping ------------------------------------------------------------------------------ */

static unsigned char pattern_byte(uint64_t page)
{
    return (unsigned char)(page * 31 + 7);
}

static void fill(struct block *b, uint64_t from, uint64_t to)
{
    for (uint64_t off = from; off < to; off += b->page_size)
        memset(b->base + off, pattern_byte(off / b->page_size), b->page_size);
}

static void verify(const struct block *b, uint64_t to)
{
    for (uint64_t off = 0; off < to; off += b->page_size) {
        unsigned char want = pattern_byte(off / b->page_size);
        for (uint64_t i = 0; i < b->page_size; i++)
            if (b->base[off + i] != want)
                die("byte 0x%" PRIx64 " is 0x%02x, not 0x%02x", off + i, b->base[off + i], want);
    }
}

/* Map [from, to) of the block's file at the same offsets in the reservation. */
static void map_range(struct block *b, uint64_t from, uint64_t to)
{
    if (to > from && mmap(b->base + from, to - from, PROT_READ | PROT_WRITE,
                          MAP_SHARED | MAP_FIXED, b->fd, (off_t)from) == MAP_FAILED)
        die("mmap of [0x%" PRIx64 ", 0x%" PRIx64 "): %s", from, to, strerror(errno));
}

/* Give up [from, to): it becomes inaccessible reserved address space again. */
static void unmap_range(struct block *b, uint64_t from, uint64_t to)
{
    if (to > from && mmap(b->base + from, to - from, PROT_NONE,
                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0)
                         == MAP_FAILED)
        die("mmap PROT_NONE of [0x%" PRIx64 ", 0x%" PRIx64 "): %s", from, to, strerror(errno));
}

/* -- the mapper's life ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET BLOCK-ID\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    struct conn c;
    struct block b = {.fd = -1};
    if (strlen(argv[2]) >= sizeof(b.id) || strpbrk(argv[2], "\"\\") != NULL)
        die("bad block id: %s", argv[2]);
    strcpy(b.id, argv[2]);
    conn_open(&c, argv[1]);
    char *line = malloc(MAX_LINE + 1);
    if (line == NULL)
        die("out of memory");

    /* 1. get-fd: the answer carries the fd; nothing else is sent before it. */
    conn_send(&c, "{\"jsonrpc\":\"2.0\",\"method\":\"ram-block-get-fd\",\"params\":{\"id\":\"%s\"},"
                  "\"id\":1}", b.id);
    if (conn_line(&c, line, MAX_LINE + 1) == NULL)
        die("the daemon closed the connection");
    if (answer_id(line) != 1 || strstr(line, "\"result\":") == NULL)
        die("ram-block-get-fd failed: %s", line);
    if (c.fd < 0)
        die("the answer came without an fd: %s", line);
    b.fd = c.fd;
    b.size = json_u64(line, "size");
    b.max_size = json_u64(line, "max-size");
    b.page_size = json_u64(line, "page-size");

    /* 2. map it with the daemon's layout and write the pattern. */
    b.base = mmap(NULL, b.max_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                  -1, 0);
    if (b.base == MAP_FAILED)
        die("cannot reserve 0x%" PRIx64 " bytes: %s", b.max_size, strerror(errno));
    map_range(&b, 0, b.size);
    fill(&b, 0, b.size);
    printf("mapped %s size=%" PRIu64 " max-size=%" PRIu64 " page-size=%" PRIu64 "\n", b.id,
           b.size, b.max_size, b.page_size);

    /* 3. follow the block's events. */
    long next_id = 2, removed_ack = -1;
    int removed = 0;
    while (conn_line(&c, line, MAX_LINE + 1) != NULL) {
        const char *data = strstr(line, "\"data\":{");
        if (is_event(line, "RAM_BLOCK_RESIZED") && data != NULL && about(data, &b)) {
            uint64_t seq = json_u64(data, "seq");
            uint64_t old_size = json_u64(data, "old-size");
            uint64_t new_size = json_u64(data, "new-size");
            int ack = strstr(data, "\"ack\":true") != NULL;
            printf("event RAM_BLOCK_RESIZED seq=%" PRIu64 " %" PRIu64 " -> %" PRIu64
                   " ack=%s\n", seq, old_size, new_size, ack ? "true" : "false");
            if (new_size > b.size) {
                /* grow: the daemon mapped the new range before it sent the event */
                map_range(&b, b.size, new_size);
                verify(&b, b.size);
                fill(&b, b.size, new_size);
                b.size = new_size;
                printf("grew to %" PRIu64 ": old contents intact, tail filled\n", b.size);
            } else if (new_size < b.size) {
                /* shrink: from here on only [0, new_size) is touched */
                uint64_t old = b.size;
                b.size = new_size;
                unmap_range(&b, new_size, old);
                verify(&b, b.size);
                printf("shrank to %" PRIu64 ": tail unmapped, contents intact\n", b.size);
            }
            if (ack) {
                conn_send(&c, "{\"jsonrpc\":\"2.0\",\"method\":\"ram-block-ack\","
                              "\"params\":{\"seq\":%" PRIu64 "},\"id\":%ld}", seq, next_id++);
                printf("sent ram-block-ack seq=%" PRIu64 "\n", seq);
            }
        } else if (is_event(line, "RAM_BLOCK_REMOVED") && data != NULL && about(data, &b)) {
            uint64_t seq = json_u64(data, "seq");
            int ack = strstr(data, "\"ack\":true") != NULL;
            printf("event RAM_BLOCK_REMOVED seq=%" PRIu64 " ack=%s\n", seq,
                   ack ? "true" : "false");
            if (munmap(b.base, b.max_size) < 0)
                die("munmap: %s", strerror(errno));
            close(b.fd);
            removed = 1;
            printf("unmapped and closed the fd\n");
            if (!ack)
                break;
            removed_ack = next_id;
            conn_send(&c, "{\"jsonrpc\":\"2.0\",\"method\":\"ram-block-ack\","
                          "\"params\":{\"seq\":%" PRIu64 "},\"id\":%ld}", seq, next_id++);
            printf("sent ram-block-ack seq=%" PRIu64 "\n", seq);
        } else if (strncmp(line, "{\"jsonrpc\":\"2.0\",\"method\":", 27) == 0) {
            printf("other event: %s\n", line); /* e.g. RAM_BLOCK_ATTACHED of this block */
        } else {
            long id = answer_id(line);
            if (strstr(line, "\"error\":") != NULL)
                die("request %ld failed: %s", id, line);
            printf("answer to request %ld: ok\n", id);
            if (id == removed_ack)
                break;
        }
    }
    if (!removed)
        die("the daemon closed the connection before the block was removed");
    printf("done\n");
    free(line);
    free(c.buf);
    close(c.sock);
    return 0;
}
