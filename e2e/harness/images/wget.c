/*
 * `wget` for the test images of Weft's e2e harness, in place of busybox's:
 * Debian's static busybox is built without wget's timeout option and
 * crashes when given `-T`, which upstream's Service tests pass
 * (`wget -q -O - -T 1 URL`, `wget -T 5 -qO- URL`).
 *
 * What busybox's applet does for those tests: an HTTP GET of one http://
 * URL (host name, IPv4 or [IPv6] address, optional port), the body to the
 * file of -O (`-` for stdout; by default the URL's last path segment),
 * `-T SEC` bounding the connect and every read, exit status 0 for a 2xx
 * answer and 1 for anything else with the reason on stderr. `-q` is
 * accepted (there is no progress output to silence). No https, proxies,
 * redirects or retries.
 *
 * HTTP/1.0 is asked for, so the answer is never chunked and ends when the
 * server closes the connection. Built statically so that the image needs
 * no libc.
 */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Busybox's default read timeout, for a command line without -T. */
#define DEFAULT_TIMEOUT_SECONDS 900

static int timeout_ms = DEFAULT_TIMEOUT_SECONDS * 1000;

static void fail(const char *format, const char *argument) {
  fputs("wget: ", stderr);
  fprintf(stderr, format, argument);
  fputc('\n', stderr);
  exit(1);
}

/* Waits until `fd` is ready for `events`; fails the download on timeout. */
static void await(int fd, short events) {
  struct pollfd poller = {.fd = fd, .events = events};
  int ready;
  do {
    ready = poll(&poller, 1, timeout_ms);
  } while (ready < 0 && errno == EINTR);
  if (ready == 0) {
    fail("download timed out%s", "");
  }
  if (ready < 0) {
    fail("poll: %s", strerror(errno));
  }
}

/* One connect attempt, bounded by the timeout; -1 with errno set on error. */
static int connect_to(const struct addrinfo *address) {
  int fd = socket(address->ai_family, address->ai_socktype | SOCK_NONBLOCK,
                  address->ai_protocol);
  if (fd < 0) {
    return -1;
  }
  if (connect(fd, address->ai_addr, address->ai_addrlen) < 0) {
    if (errno != EINPROGRESS) {
      int saved = errno;
      close(fd);
      errno = saved;
      return -1;
    }
    await(fd, POLLOUT);
    int error = 0;
    socklen_t length = sizeof error;
    getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
    if (error != 0) {
      close(fd);
      errno = error;
      return -1;
    }
  }
  return fd;
}

/* Reads what is available, waiting at most the timeout; 0 at the end. */
static ssize_t read_some(int fd, char *buffer, size_t size) {
  for (;;) {
    await(fd, POLLIN);
    ssize_t got = read(fd, buffer, size);
    if (got >= 0) {
      return got;
    }
    if (errno != EINTR && errno != EAGAIN) {
      fail("read error: %s", strerror(errno));
    }
  }
}

static void write_all(int fd, const char *data, size_t size) {
  while (size > 0) {
    ssize_t written = write(fd, data, size);
    if (written < 0 && errno == EINTR) {
      continue;
    }
    if (written < 0) {
      fail("write error: %s", strerror(errno));
    }
    data += written;
    size -= (size_t)written;
  }
}

int main(int argc, char **argv) {
  const char *output = NULL;
  int option;
  while ((option = getopt(argc, argv, "qO:T:")) != -1) {
    switch (option) {
    case 'q':
      break;
    case 'O':
      output = optarg;
      break;
    case 'T': {
      char *end;
      long seconds = strtol(optarg, &end, 10);
      if (*end != '\0' || seconds <= 0 || seconds > 86400) {
        fail("invalid -T '%s': give whole seconds, 1 to 86400", optarg);
      }
      timeout_ms = (int)seconds * 1000;
      break;
    }
    default:
      fputs("usage: wget [-q] [-O FILE] [-T SEC] http://HOST[:PORT][/PATH]\n",
            stderr);
      return 1;
    }
  }
  if (optind != argc - 1) {
    fail("give exactly one URL%s", "");
  }
  const char *url = argv[optind];
  if (strncmp(url, "http://", 7) != 0) {
    fail("only http:// URLs are supported: '%s'", url);
  }

  /* http://HOST[:PORT][/PATH], HOST being a name, an IPv4 address or an
   * IPv6 address in brackets. */
  const char *authority = url + 7;
  const char *path = strchr(authority, '/');
  size_t authority_length =
      path ? (size_t)(path - authority) : strlen(authority);
  if (path == NULL) {
    path = "/";
  }
  char host[256];
  char port[16] = "80";
  const char *host_start = authority;
  size_t host_length;
  const char *after_host;
  if (authority[0] == '[') {
    const char *close_bracket = memchr(authority, ']', authority_length);
    if (close_bracket == NULL) {
      fail("bad address in '%s'", url);
    }
    host_start = authority + 1;
    host_length = (size_t)(close_bracket - host_start);
    after_host = close_bracket + 1;
  } else {
    const char *colon = memchr(authority, ':', authority_length);
    host_length =
        colon ? (size_t)(colon - authority) : authority_length;
    after_host = authority + host_length;
  }
  size_t port_length = (size_t)(authority + authority_length - after_host);
  if (port_length > 0) {
    if (*after_host != ':' || port_length - 1 == 0 ||
        port_length - 1 >= sizeof port) {
      fail("bad port in '%s'", url);
    }
    memcpy(port, after_host + 1, port_length - 1);
    port[port_length - 1] = '\0';
  }
  if (host_length == 0 || host_length >= sizeof host) {
    fail("bad host in '%s'", url);
  }
  memcpy(host, host_start, host_length);
  host[host_length] = '\0';

  struct addrinfo hints = {.ai_family = AF_UNSPEC,
                           .ai_socktype = SOCK_STREAM};
  struct addrinfo *addresses;
  if (getaddrinfo(host, port, &hints, &addresses) != 0) {
    fail("bad address '%s'", host);
  }
  int fd = -1;
  for (struct addrinfo *address = addresses; address && fd < 0;
       address = address->ai_next) {
    fd = connect_to(address);
  }
  if (fd < 0) {
    fprintf(stderr, "wget: can't connect to remote host (%s): %s\n", host,
            strerror(errno));
    return 1;
  }
  freeaddrinfo(addresses);

  char request[4096];
  int request_length = snprintf(
      request, sizeof request,
      "GET %s HTTP/1.0\r\nHost: %.*s\r\nUser-Agent: Wget\r\n"
      "Connection: close\r\n\r\n",
      path, (int)authority_length, authority);
  if (request_length < 0 || (size_t)request_length >= sizeof request) {
    fail("URL too long: '%s'", url);
  }
  write_all(fd, request, (size_t)request_length);

  /* The status line and headers, up to the blank line. */
  static char buffer[65536];
  size_t held = 0;
  char *body = NULL;
  while (body == NULL) {
    if (held == sizeof buffer - 1) {
      fail("the server's headers are too long%s", "");
    }
    ssize_t got = read_some(fd, buffer + held, sizeof buffer - 1 - held);
    if (got == 0) {
      fail("connection closed before the server's answer ended its "
           "headers%s",
           "");
    }
    held += (size_t)got;
    buffer[held] = '\0';
    body = strstr(buffer, "\r\n\r\n");
  }
  body += 4;
  char *status_end = strstr(buffer, "\r\n");
  *status_end = '\0';
  const char *code = strchr(buffer, ' ');
  if (code == NULL || code[1] != '2') {
    fail("server returned error: %s", buffer);
  }

  int out = STDOUT_FILENO;
  if (output == NULL) {
    /* The last path segment, as busybox names the file. */
    const char *slash = strrchr(path, '/');
    output = slash[1] != '\0' ? slash + 1 : "index.html";
  }
  if (strcmp(output, "-") != 0) {
    out = open(output, O_WRONLY | O_CREAT | O_TRUNC, 0666);
    if (out < 0) {
      fail("can't open '%s'", output);
    }
  }
  write_all(out, body, held - (size_t)(body - buffer));
  ssize_t got;
  while ((got = read_some(fd, buffer, sizeof buffer)) > 0) {
    write_all(out, buffer, (size_t)got);
  }
  return 0;
}
