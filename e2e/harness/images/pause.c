/*
 * The pod sandbox's process for kubelet nodes of Weft's e2e harness (what
 * registry.k8s.io/pause is in a cluster with a registry), and the init of each
 * kubelet node's own PID namespace.
 *
 * As PID 1 it must reap the orphans re-parented to it, and it must exit on
 * SIGINT/SIGTERM: the kernel delivers only signals with a handler to a
 * namespace's init. Built statically so that the image needs nothing else.
 */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signal_number) {
  (void)signal_number;
  _exit(0);
}

static void reap(int signal_number) {
  (void)signal_number;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction action = {0};
  action.sa_handler = stop;
  sigaction(SIGINT, &action, NULL);
  sigaction(SIGTERM, &action, NULL);
  action.sa_handler = reap;
  action.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigaction(SIGCHLD, &action, NULL);
  for (;;) {
    pause();
  }
}
