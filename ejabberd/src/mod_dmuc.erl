%%% mod_dmuc: Distributed MUC (DMUC3) for ejabberd.
%%%
%%% A thin shim over the dmuc engine (Rust, loaded by dmuc_nif). It forwards hook events into the
%%% engine and routes what comes back; no protocol logic lives here.
%%%
%%% Master (option trusted_mirrors): each MUC room process keeps its own engine in its process
%%% dictionary. Hooks: muc_filter_presence (joins, leaves, nick changes), muc_process_iq (history
%%% and roster requests; link changes), muc_filter_message (a message a mirror sent twice; the
%%% stanza-id a mirror proposed),
%%% multicast_route (groupchat fan-out: one copy per mirror), filter_packet (the room's
%%% per-occupant presences, history and subject; join errors; the mirrors' pings), leave_room.
%%% This module's process keeps one link watch per MUC service: it answers the mirrors' pings,
%%% times their silences, and tells each room when a mirror is lost or back.
%%%
%%% Mirror (options mirror_host, masters): one engine per mirror service, held by this module's
%%% process, its outbound queue stored in Mnesia. Hooks: user_send_packet (local users' stanzas
%%% for mirrored rooms), user_receive_packet (join errors and bounces sent straight to a user),
%%% filter_packet (answers to the mirror's pings), and a route for mirror_host.
%%%
%%% `ejabberdctl dmuc_status` shows every link, its queue and its last resync.
-module(mod_dmuc).
-behaviour(gen_mod).
-behaviour(gen_server).

-export([start/2, stop/1, reload/3, depends/2, mod_options/1, mod_opt_type/1, mod_doc/0]).
-export([start_link/2, init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2,
         code_change/3]).
-export([muc_filter_presence/3, muc_process_iq/2, multicast_route/1, filter_packet/1,
         leave_room/4, user_send_packet/1, user_receive_packet/1, c2s_self_presence/1, c2s_terminated/2, route/1,
         muc_filter_message/3, filter_pong/1, s2s_out_closed/2, s2s_in_closed/2,
         watch_s2s_out_closed/2, watch_s2s_in_closed/2, get_commands_spec/0,
         dmuc_status/0, guard_send/1, guard_s2s/1]).

-include("logger.hrl").
-include("xmpp.hrl").
-include("mod_muc_room.hrl").
-include("translate.hrl").

-include("ejabberd_commands.hrl").

-define(NS_DMUC, <<"http://tridsys.com/protocol/dmuc">>).
-define(NS_LINK, <<"urn:xmpp:dmuc:link:0">>).
-define(MASTER_KEY, dmuc_master).
-define(LIMITS_KEY, dmuc_limits).
%% The host whose engine this process calls: the engine's log lines name it, as Prosody's
%% module:log names the module's host.
-define(LOG_HOST_KEY, dmuc_log_host).
%% The sender of the stanza this process is handing the engine (set by enc/2).
-define(PEER_KEY, dmuc_peer).
%% Bounded input (docs/security.md, "Bounded input"): the engine's defaults (src/bounds.rs).
-define(DEFAULT_MAX_DEPTH, 64).
-define(DEFAULT_MAX_SIZE, 524288).
%% Local users' stanzas are taken after mod_vcard_xupdate (50) has added the avatar hash to
%% their presence, so that the room gets the presence a direct user would send.
-define(SEND_PRIO, 90).
%% The depth guard runs before everything else that looks at a stanza.
-define(GUARD_PRIO, 1).

%% The mirror's outbound queue, stored so that a restart loses nothing: one row per item, keyed
%% by the mirror service and the item's sequence number (the engine orders them on import).
-record(dmuc_queue_item, {key :: {binary(), non_neg_integer()}, item :: binary()}).
%% The whole-queue row of older versions, read once at start and dropped.
-record(dmuc_queue, {service :: binary(), items = [] :: [binary()]}).

%%%===================================================================
%%% gen_mod
%%%===================================================================
start(Host, Opts) ->
    Limits = {gen_mod:get_opt(max_stanza_depth, Opts), gen_mod:get_opt(max_stanza_size, Opts)},
    persistent_term:put({?MODULE, limits, Host}, Limits),
    case gen_mod:get_opt(trusted_mirrors, Opts) of
        [] -> ok;
        Trusted ->
            %% The per-mirror limits count across rooms: every room process's engine shares
            %% the host's quota.
            Quota = dmuc_nif:master_quota(gen_mod:get_opt(max_rooms_per_mirror, Opts),
                                          gen_mod:get_opt(mirror_join_rate, Opts),
                                          gen_mod:get_opt(mirror_join_burst, Opts)),
            %% Fail now, with the option named, rather than in the first room.
            case dmuc_nif:master_new(Trusted, element(1, Limits), element(2, Limits), Quota) of
                {ok, _} -> ok;
                {error, Reason} -> erlang:error({bad_option, Reason})
            end,
            persistent_term:put({?MODULE, master_config, Host}, Trusted),
            persistent_term:put({?MODULE, master_quota, Host}, Quota),
            %% ejabberd 23.01 itself dies on deep stanzas: its rooms size every message and
            %% bounce payloads with fxml's serializer, which recurses in C on a scheduler's
            %% stack (10,000 levels kill the VM, with or without mod_dmuc). Stanzas for the MUC
            %% services dmuc serves are checked on the stream, before a room sees them.
            [persistent_term:put({?MODULE, guarded, S}, Limits)
             || S <- gen_mod:get_module_opt_hosts(Host, mod_muc)],
            ejabberd_hooks:add(user_send_packet, Host, ?MODULE, guard_send, ?GUARD_PRIO),
            ejabberd_hooks:add(s2s_receive_packet, Host, ?MODULE, guard_s2s, ?GUARD_PRIO),
            ejabberd_hooks:add(muc_filter_presence, Host, ?MODULE, muc_filter_presence, 50),
            %% Before mod_mam's (50): it must not archive a duplicate, and takes our stanza_id.
            ejabberd_hooks:add(muc_filter_message, Host, ?MODULE, muc_filter_message, 40),
            ejabberd_hooks:add(muc_process_iq, Host, ?MODULE, muc_process_iq, 50),
            ejabberd_hooks:add(multicast_route, Host, ?MODULE, multicast_route, 50),
            ejabberd_hooks:add(leave_room, Host, ?MODULE, leave_room, 50),
            ejabberd_hooks:add(filter_packet, ?MODULE, filter_packet, 50)
    end,
    ejabberd_commands:register_commands(?MODULE, get_commands_spec()),
    %% This module's process: the master's link watch and/or the mirror engine.
    case {gen_mod:get_opt(trusted_mirrors, Opts), gen_mod:get_opt(masters, Opts)} of
        {[], []} -> ok;
        _ -> gen_mod:start_child(?MODULE, Host, Opts)
    end.

stop(Host) ->
    case persistent_term:get({?MODULE, master_config, Host}, undefined) of
        undefined -> ok;
        _ ->
            ejabberd_hooks:delete(muc_filter_presence, Host, ?MODULE, muc_filter_presence, 50),
            ejabberd_hooks:delete(muc_filter_message, Host, ?MODULE, muc_filter_message, 40),
            ejabberd_hooks:delete(muc_process_iq, Host, ?MODULE, muc_process_iq, 50),
            ejabberd_hooks:delete(multicast_route, Host, ?MODULE, multicast_route, 50),
            ejabberd_hooks:delete(leave_room, Host, ?MODULE, leave_room, 50),
            ejabberd_hooks:delete(filter_packet, ?MODULE, filter_packet, 50),
            ejabberd_hooks:delete(user_send_packet, Host, ?MODULE, guard_send, ?GUARD_PRIO),
            ejabberd_hooks:delete(s2s_receive_packet, Host, ?MODULE, guard_s2s, ?GUARD_PRIO),
            [persistent_term:erase({?MODULE, guarded, S}) || S <- gen_mod:get_module_opt_hosts(Host, mod_muc)],
            persistent_term:erase({?MODULE, master_config, Host}),
            persistent_term:erase({?MODULE, master_quota, Host})
    end,
    %% This module's process, if this host has one (its terminate/2 unhooks what it hooked).
    gen_mod:stop_child(?MODULE, Host).

reload(Host, NewOpts, _OldOpts) ->
    stop(Host),
    start(Host, NewOpts).

depends(_Host, _Opts) -> [].

mod_opt_type(trusted_mirrors) -> econf:list(econf:domain());
mod_opt_type(mirror_host) -> econf:host();
mod_opt_type(masters) -> econf:list(econf:domain());
mod_opt_type(queue_limit) -> econf:pos_int();
mod_opt_type(join_timeout) -> econf:pos_int();
mod_opt_type(history_size) -> econf:pos_int();
mod_opt_type(link_timeout) -> econf:pos_int();
mod_opt_type(ping_interval) -> econf:pos_int();
mod_opt_type(ping_timeout) -> econf:pos_int();
mod_opt_type(catch_up_margin) -> econf:pos_int();
mod_opt_type(store_after) -> econf:non_neg_int();
mod_opt_type(max_local_occupants) -> econf:pos_int();
mod_opt_type(max_rooms) -> econf:pos_int();
mod_opt_type(max_rooms_per_mirror) -> econf:pos_int();
mod_opt_type(mirror_join_rate) -> econf:pos_int();
mod_opt_type(mirror_join_burst) -> econf:pos_int();
mod_opt_type(max_stanza_depth) -> econf:pos_int();
mod_opt_type(max_stanza_size) -> econf:pos_int().

mod_options(Host) ->
    [{trusted_mirrors, []},
     {mirror_host, <<"mirror.", Host/binary>>},
     {masters, []},
     {queue_limit, 1000},
     {join_timeout, 30},
     {history_size, 20},
     {link_timeout, 360},
     {ping_interval, 300},
     {ping_timeout, 20},
     {catch_up_margin, 30},
     {store_after, 2},
     {max_local_occupants, 1000},
     {max_rooms, 1000},
     {max_rooms_per_mirror, 1000},
     {mirror_join_rate, 20},
     {mirror_join_burst, 500},
     {max_stanza_depth, ?DEFAULT_MAX_DEPTH},
     {max_stanza_size, ?DEFAULT_MAX_SIZE}].

mod_doc() ->
    #{desc =>
          [?T("Distributed MUC (DMUC3): a mirror of a remote room on the users' server, so that "
              "each broadcast crosses a constrained server-to-server link once per mirror "
              "instead of once per remote occupant.")],
      opts =>
          [{trusted_mirrors,
            #{value => ?T("[Domain, ...]"),
              desc => ?T("Master role: mirror services allowed to forward joins to this "
                         "server's rooms. A mirror may speak only for users of its parent "
                         "domain.")}},
           {mirror_host,
            #{value => ?T("Host"),
              desc => ?T("Mirror role: the mirror service's domain. The default is 'mirror.@HOST@'.")}},
           {masters,
            #{value => ?T("[Domain, ...]"),
              desc => ?T("Mirror role: the MUC services to mirror for this host's users.")}},
           {queue_limit,
            #{value => ?T("Number"),
              desc => ?T("Mirror role: groupchat messages queued per room while the link is down.")}},
           {join_timeout,
            #{value => ?T("Seconds"),
              desc => ?T("Mirror role: how long a join waits for the master.")}},
           {history_size,
            #{value => ?T("Number"),
              desc => ?T("Mirror role: messages of history kept per room.")}},
           {link_timeout,
            #{value => ?T("Seconds"),
              desc => ?T("Master role: a mirror not heard from (any stanza) for this long is "
                         "lost, and its occupants leave the room (longer than the mirrors' ping "
                         "interval plus their ping timeout). The default is 360.")}},
           {ping_interval,
            #{value => ?T("Seconds"),
              desc => ?T("Mirror role: a link to a master quiet this long in either direction "
                         "gets a ping (traffic counts as one); while it is down, the longest wait "
                         "between probes. The default is 300.")}},
           {ping_timeout,
            #{value => ?T("Seconds"),
              desc => ?T("Mirror role: a ping unanswered this long means the link is down. "
                         "The default is 20.")}},
           {catch_up_margin,
            #{value => ?T("Seconds"),
              desc => ?T("Mirror role: after an outage the mirror asks for history from this "
                         "long before the newest message it has (clock skew). The default is 30.")}},
           {store_after,
            #{value => ?T("Seconds"),
              desc => ?T("Mirror role: a message sent over a link that is up is stored only if "
                         "the master has not acknowledged it after this long (write-behind); "
                         "queued messages are stored at once, held ones when the link goes down "
                         "and when the module stops. 0 stores every message at once. "
                         "The default is 2.")}},
           {max_local_occupants,
            #{value => ?T("Number"),
              desc => ?T("Mirror role: local occupants per mirrored room; a join past it gets "
                         "resource-constraint. The default is 1000.")}},
           {max_rooms,
            #{value => ?T("Number"),
              desc => ?T("Mirror role: mirrored rooms with local occupants; a join to one more "
                         "gets resource-constraint. The default is 1000.")}},
           {max_rooms_per_mirror,
            #{value => ?T("Number"),
              desc => ?T("Master role: rooms of this host's MUC services one mirror may have "
                         "occupants in; a join to one more gets resource-constraint. The "
                         "default is 1000.")}},
           {mirror_join_rate,
            #{value => ?T("Number"),
              desc => ?T("Master role: joins per second through one mirror, sustained; past it "
                         "(and the burst) a join gets resource-constraint. The default is 20.")}},
           {mirror_join_burst,
            #{value => ?T("Number"),
              desc => ?T("Master role: joins through one mirror at once (a mirror rejoins all "
                         "its users after an outage). The default is 500.")}},
           {max_stanza_depth,
            #{value => ?T("Number"),
              desc => ?T("Both roles: stanzas for the engine nesting deeper than this are refused "
                         "with policy-violation before they are serialized (at most 256). "
                         "The default is 64.")}},
           {max_stanza_size,
            #{value => ?T("Bytes"),
              desc => ?T("Both roles: stanzas for the engine longer than this are refused with "
                         "policy-violation (at most 16 MiB). The default is 524288.")}}]}.

%%%===================================================================
%%% Shared plumbing
%%%===================================================================
now_ms() -> erlang:system_time(millisecond).

%% The host's own data (history, occupants' presences, forms): already bounded on the way in.
enc(Pkt) -> fxml:element_to_binary(xmpp:encode(Pkt, ?NS_CLIENT)).

%% A stanza from a user, an outsider or a peer, as text for the engine. Past the limits it is
%% refused before it is serialized (fxml's serializer recurses per level, in C): this throws
%% {dmuc_limit, Why}, which call/1 turns into {error, {limit, Why}}.
enc({MaxDepth, MaxSize}, Pkt) ->
    %% The sender, for call/1's log line if the engine refuses the stanza.
    put(?PEER_KEY, peer_of(Pkt)),
    El = xmpp:encode(Pkt, ?NS_CLIENT),
    case deeper_than(El, MaxDepth) of
        true ->
            throw({dmuc_limit, iolist_to_binary(io_lib:format("stanza nests deeper than ~b levels", [MaxDepth]))});
        false ->
            Bin = fxml:element_to_binary(El),
            case byte_size(Bin) > MaxSize of
                true ->
                    throw({dmuc_limit, iolist_to_binary(io_lib:format("stanza of ~b bytes exceeds the limit of ~b bytes",
                                                                      [byte_size(Bin), MaxSize]))});
                false -> Bin
            end
    end.

%% Does the element nest deeper than Max levels (itself being level 1)? The recursion stops one
%% level past Max, so it is bounded by the limit, not by the stanza.
deeper_than(#xmlel{}, 0) -> true;
deeper_than(#xmlel{children = Els}, Max) -> lists:any(fun(E) -> deeper_than(E, Max - 1) end, Els);
deeper_than(_, _) -> false.

limits(Host) -> persistent_term:get({?MODULE, limits, Host}, {?DEFAULT_MAX_DEPTH, ?DEFAULT_MAX_SIZE}).

%% A local user's or a peer's stanza for a guarded MUC service, past the depth or the size
%% limit: refused with policy-violation before the room (or anything else) walks it.
guard_send({Pkt, C2S} = Acc) ->
    case guard(Pkt) of
        ok -> Acc;
        refused -> {drop, C2S}
    end;
guard_send(Acc) -> Acc.

guard_s2s({Pkt, State} = Acc) ->
    case guard(Pkt) of
        ok -> Acc;
        refused -> {drop, State}
    end;
guard_s2s(Acc) -> Acc.

guard(Pkt) ->
    case xmpp:get_to(Pkt) of
        #jid{lserver = Domain} ->
            case persistent_term:get({?MODULE, guarded, Domain}, undefined) of
                undefined -> ok;
                {MaxDepth, MaxSize} ->
                    %% The stanza itself is level 1; decoded children are shallow records.
                    Why = case lists:any(fun(E) -> deeper_than(E, MaxDepth - 1) end, xmpp:get_els(Pkt)) of
                              true ->
                                  io_lib:format("stanza nests deeper than ~b levels", [MaxDepth]);
                              false ->
                                  %% Within the depth limit, so fxml's serializer is safe. The
                                  %% size too: a stranger's oversized groupchat message would
                                  %% otherwise be answered by the room (not-acceptable), with
                                  %% its payload, before dmuc sees it.
                                  Size = byte_size(fxml:element_to_binary(xmpp:encode(Pkt, ?NS_CLIENT))),
                                  case Size > MaxSize of
                                      true -> io_lib:format("stanza of ~b bytes exceeds the limit of ~b bytes",
                                                            [Size, MaxSize]);
                                      false -> ok
                                  end
                          end,
                    case Why of
                        ok -> ok;
                        _ ->
                            Text = iolist_to_binary(Why),
                            log_refusal(peer_of(Pkt), "refused a stanza from ~ts to ~ts: ~ts",
                                        [jid:encode(xmpp:get_from(Pkt)), jid:encode(xmpp:get_to(Pkt)), Text]),
                            refuse(Pkt, {limit, Text}),
                            refused
                    end
            end;
        _ -> ok
    end.

%% The limits of the room process's master (set with it), else the defaults.
room_limits() ->
    case get(?LIMITS_KEY) of
        undefined -> {?DEFAULT_MAX_DEPTH, ?DEFAULT_MAX_SIZE};
        L -> L
    end.

%% Answer a stanza the engine refused: policy-violation for one past the limits (logged at warn
%% by call/1), bad-request otherwise. The error carries none of the payload: a bomb is not echoed.
refuse(Pkt, {limit, Why}) ->
    ejabberd_router:route_error(without_payload(Pkt), xmpp:err_policy_violation(Why, <<"en">>));
refuse(Pkt, nif_panicked) ->
    %% The engine failed inside (rustler turned its panic into this): not the sender's fault.
    %% type cancel, as RFC 6120 §8.3.3.6 and Prosody give it (the xmpp library says wait).
    Err = xmpp:err_internal_server_error(<<"Internal error in dmuc">>, <<"en">>),
    ejabberd_router:route_error(Pkt, Err#stanza_error{type = cancel});
refuse(Pkt, _) ->
    ejabberd_router:route_error(Pkt, xmpp:err_bad_request()).

%% The stanza with none of its content: the bodies, subjects and statuses of the decoded records
%% too (an oversized body is the size bomb).
without_payload(#message{} = M) -> M#message{body = [], subject = [], thread = undefined, sub_els = []};
without_payload(#presence{} = P) -> P#presence{status = [], sub_els = []};
without_payload(Pkt) -> xmpp:set_els(Pkt, []).

%% Route every stanza the engine produced.
route_out(Xmls) ->
    lists:foreach(
      fun(Xml) ->
              try
                  El = fxml_stream:parse_element(Xml),
                  %% ignore_els: our payloads pass through as XML, not re-encoded by xmpp.
                  ejabberd_router:route(xmpp:decode(El, ?NS_CLIENT, [ignore_els]))
              catch Class:Reason ->
                      ?ERROR_MSG("dmuc: cannot route engine output ~ts: ~p:~p", [Xml, Class, Reason])
              end
      end, Xmls).

%% Engine logs into ejabberd's log, under the host whose engine made them.
flush_logs() ->
    H = log_host(),
    lists:foreach(
      fun({<<"error">>, M}) -> ?ERROR_MSG("dmuc (~ts): ~ts", [H, M]);
         ({<<"warning">>, M}) -> ?WARNING_MSG("dmuc (~ts): ~ts", [H, M]);
         ({<<"info">>, M}) -> ?INFO_MSG("dmuc (~ts): ~ts", [H, M]);
         ({_, M}) -> ?DEBUG("dmuc (~ts): ~ts", [H, M])
      end, dmuc_nif:take_logs()).

log_host() ->
    case get(?LOG_HOST_KEY) of
        undefined -> <<"-">>;
        H -> H
    end.

%% A peer is a user of this node (who cannot forge their JID) or a remote domain (whose
%% server makes up the rest).
peer_of(Pkt) ->
    case xmpp:get_from(Pkt) of
        #jid{luser = U, lserver = S} when U /= <<>> ->
            case ejabberd_router:is_my_host(S) of
                true -> <<U/binary, "@", S/binary>>;
                false -> S
            end;
        #jid{lserver = S} -> S;
        _ -> <<>>
    end.

%% A refusal of a peer's stanza, logged at warn at most once per peer a minute (the engine's own
%% refusals are limited the same way): a flood of bad stanzas costs a line, not a line each.
log_refusal(Peer, Fmt, Args) ->
    case dmuc_nif:refusal_log(Peer, now_ms()) of
        {true, 0} -> ?WARNING_MSG("dmuc (~ts) " ++ Fmt, [log_host() | Args]);
        {true, N} -> ?WARNING_MSG("dmuc (~ts) " ++ Fmt ++ " (and ~b more from ~ts since the last)",
                                  [log_host() | Args] ++ [N, Peer]);
        {false, _} -> ok
    end.

%% Call the engine; an error or a panic is logged, never raised into the hook. NIF results
%% come as {ok, Value} or {error, Reason}; this returns Value or {error, Reason}.
%% call/1 in a process that is not the host's own (a c2s, s2s or router process running a hook):
%% the engine's logs go under Host, and the process is left as it was.
call_for(undefined, F) -> call(F);
call_for(Host, F) ->
    Old = put(?LOG_HOST_KEY, Host),
    try call(F)
    after
        case Old of
            undefined -> erase(?LOG_HOST_KEY);
            _ -> put(?LOG_HOST_KEY, Old)
        end
    end.

call(F) ->
    Result = try F()
             catch throw:{dmuc_limit, Limit} ->
                     {error, {limit, Limit}};
                   Class:Reason:Stack ->
                     ?ERROR_MSG("dmuc: engine call failed: ~p:~p ~p", [Class, Reason, Stack]),
                     {error, Reason}
             end,
    flush_logs(),
    Peer = case erase(?PEER_KEY) of undefined -> <<>>; P -> P end,
    case Result of
        {ok, Value} -> Value;
        {error, {limit, Why}} -> log_refusal(Peer, "refused a stanza from ~ts: ~ts", [Peer, Why]), {error, {limit, Why}};
        {error, Why} -> log_refusal(Peer, "refused input from ~ts: ~p", [Peer, Why]), {error, Why};
        Other -> Other
    end.

%% The mirror's elements (the join marker, a message's de-duplication key) are for the master
%% only: the room must not show them to occupants.
strip_marker(Pkt) ->
    xmpp:set_els(Pkt, [El || El <- xmpp:get_els(Pkt),
                            not (is_record(El, xmlel) andalso
                                 lists:member(fxml:get_tag_attr_s(<<"xmlns">>, El),
                                              [?NS_DMUC, <<"urn:xmpp:dmuc:0">>]))]).

%%%===================================================================
%%% Master
%%%===================================================================
master(ServerHost) ->
    case get(?MASTER_KEY) of
        undefined ->
            Trusted = persistent_term:get({?MODULE, master_config, ServerHost}, []),
            {MaxDepth, MaxSize} = Limits = limits(ServerHost),
            Quota = case persistent_term:get({?MODULE, master_quota, ServerHost}, undefined) of
                        %% No mirror is trusted here: none may join anyway.
                        undefined -> dmuc_nif:master_quota(0, 0, 0);
                        Q -> Q
                    end,
            {ok, M} = dmuc_nif:master_new(Trusted, MaxDepth, MaxSize, Quota),
            put(?MASTER_KEY, M),
            put(?LOG_HOST_KEY, ServerHost),
            put(?LIMITS_KEY, Limits),
            M;
        M -> M
    end.

muc_filter_presence(drop, _State, _Nick) -> drop;
muc_filter_presence(#presence{} = Pkt, #state{server_host = SH} = State, Nick) ->
    M = master(SH),
    case call(fun() -> dmuc_nif:master_presence(M, now_ms(), enc(limits(SH), Pkt), Nick) end) of
        {error, Why} ->
            refuse(Pkt, Why),
            drop;
        {refused, Out} ->
            route_out(Out),
            drop;
        {{join, Mirror, Sync}, Out} ->
            route_out(Out),
            watch_hear(State, Mirror),
            case Sync of
                true -> snapshot(M, State, Mirror, Nick);
                false -> ok
            end,
            strip_marker(Pkt);
        {_, Out} ->
            route_out(Out),
            case dmuc_nif:master_routes(M, jid:encode(xmpp:get_from(Pkt))) of
                true -> watch_hear_from(State, xmpp:get_from(Pkt));
                false -> ok
            end,
            strip_marker(Pkt)
    end.

%% Anything from an occupant behind a mirror, or from a mirror, proves its link (traffic is
%% proof of life: a busy mirror sends no pings).
watch_hear_from(#state{host = Service}, #jid{lserver = Domain}) ->
    case persistent_term:get({?MODULE, watch, Service}, undefined) of
        undefined -> ok;
        {W, Proc} ->
            case call(fun() -> dmuc_nif:watch_hear_from(W, now_ms(), Domain) end) of
                {_, [], _} -> ok;
                {_, Events, At} -> gen_server:cast(Proc, {link_events, Service, Events, At});
                _ -> ok
            end
    end;
watch_hear_from(_State, _From) -> ok.

%% A join through a mirror: the service's link watch hears the mirror (it times the mirror's
%% silence from now, and probes it if an s2s session closes, before its first ping comes).
watch_hear(#state{host = Service}, Mirror) ->
    case persistent_term:get({?MODULE, watch, Service}, undefined) of
        undefined -> ok;
        {W, Proc} ->
            case call(fun() -> dmuc_nif:watch_hear(W, now_ms(), Mirror) end) of
                {_, Events, At} -> gen_server:cast(Proc, {link_events, Service, Events, At});
                _ -> ok
            end
    end.

%% The room as the mirror needs it: a config form carrying the whois rule and whether mod_mam
%% archives the room (the engine tells the mirror whether to stamp stanza-ids from it), and each
%% occupant's presence with a muc#user item.
snapshot(M, #state{jid = RoomJID, config = Config, users = Users, server_host = SH} = State,
         Mirror, Nick) ->
    Whois = case Config#config.anonymous of true -> <<"moderators">>; false -> <<"anyone">> end,
    Mam = case Config#config.mam andalso gen_mod:is_loaded(SH, mod_mam) of
              true -> <<"1">>;
              false -> <<"0">>
          end,
    Form = #xdata{type = form,
                  fields = [#xdata_field{var = <<"FORM_TYPE">>, type = hidden,
                                         values = [<<"http://jabber.org/protocol/muc#roomconfig">>]},
                            #xdata_field{var = <<"muc#roomconfig_whois">>, type = 'list-single',
                                         values = [Whois]},
                            #xdata_field{var = <<"muc#roomconfig_mam">>, type = boolean,
                                         values = [Mam]}]},
    Occupants = maps:fold(
                  fun(_, #user{jid = JID, nick = N, role = Role, last_presence = LP}, Acc) ->
                          Pres = case LP of undefined -> #presence{}; _ -> LP end,
                          Aff = affiliation(JID, State),
                          Item = #muc_item{affiliation = Aff, role = Role, jid = JID},
                          P = xmpp:set_subtag(
                                xmpp:set_from_to(strip_marker(Pres),
                                                 jid:replace_resource(RoomJID, N), undefined),
                                #muc_user{items = [Item]}),
                          [enc(P) | Acc]
                  end, [], Users),
    Room = jid:encode(RoomJID),
    FormXml = fxml:element_to_binary(xmpp:encode(Form)),
    case call(fun() -> dmuc_nif:master_snapshot(M, now_ms(), Room, Mirror, Nick, FormXml, Occupants) end) of
        {error, _} -> ok;
        Out -> route_out(Out)
    end.

affiliation(JID, #state{affiliations = Affs}) ->
    case maps:get(jid:tolower(jid:remove_resource(JID)), Affs, none) of
        {A, _Reason} -> A;
        A -> A
    end.

%% History requests from mirrors; answers to the engine's sync IQs.
muc_process_iq(#iq{type = get} = IQ, #state{server_host = SH, jid = RoomJID} = State) ->
    case [E || #xmlel{name = Name} = E <- xmpp:get_els(IQ),
               Name == <<"room">> orelse Name == <<"roster">>,
               fxml:get_tag_attr_s(<<"xmlns">>, E) == <<"urn:xmpp:dmuc:0">>] of
        [] -> IQ;
        _ ->
            M = master(SH),
            watch_hear_from(State, xmpp:get_from(IQ)),
            case call(fun() -> dmuc_nif:master_iq(M, now_ms(), enc(limits(SH), IQ)) end) of
                {{history, Req}, Out} ->
                    route_out(Out),
                    history(M, Req, RoomJID, State),
                    ignore;
                {{snapshot, _Room, Mirror}, Out} ->
                    %% A mirror back from an outage asks for the roster.
                    route_out(Out),
                    snapshot(M, State, Mirror, <<>>),
                    ignore;
                {error, {limit, Why}} ->
                    xmpp:make_error(xmpp:set_els(IQ, []), xmpp:err_policy_violation(Why, <<"en">>));
                {error, _} ->
                    xmpp:make_error(IQ, xmpp:err_bad_request());
                {_, Out} ->
                    route_out(Out),
                    ignore
            end
    end;
muc_process_iq(#iq{type = set, from = #jid{luser = <<>>, lresource = <<>>, lserver = Service}} = IQ,
               #state{server_host = SH, jid = #jid{lserver = Service}}) ->
    %% From our own MUC service (this module's link watch): a mirror was lost or is back.
    case [E || #xmlel{name = <<"link">>} = E <- xmpp:get_els(IQ),
               fxml:get_tag_attr_s(<<"xmlns">>, E) == ?NS_LINK] of
        [Link] ->
            Mirror = fxml:get_tag_attr_s(<<"mirror">>, Link),
            Up = fxml:get_tag_attr_s(<<"up">>, Link) == <<"true">>,
            case get(?MASTER_KEY) of
                undefined -> ok;
                _ ->
                    case call(fun() -> dmuc_nif:master_link(master(SH), now_ms(), Mirror, Up) end) of
                        {error, _} -> ok;
                        Actions -> lists:foreach(fun evict/1, Actions)
                    end
            end,
            ignore;
        _ -> IQ
    end;
muc_process_iq(IQ, _State) ->
    IQ.

%% An occupant behind a lost mirror leaves the room. The room cannot be told "status 333", so
%% the leave comes from the occupant, with a reason, as if their server had said it.
evict({evict, Room, Nick, Jid}) ->
    try
        ejabberd_router:route(
          #presence{type = unavailable, from = jid:decode(Jid),
                    to = jid:replace_resource(jid:decode(Room), Nick),
                    status = [#text{data = <<"The link to this user's server is lost">>}]})
    catch _:Why -> ?WARNING_MSG("dmuc: cannot evict ~ts from ~ts: ~p", [Nick, Room, Why])
    end;
evict(_) -> ok.

%% A groupchat message a mirror sent again after an outage, which the room already broadcast:
%% dropped. The stanza-id a mirror proposed for its user's message (docs/protocol.md, "Stanza
%% ids"), when the engine accepts it, goes into the packet's meta: mod_mam's muc_filter_message
%% (priority 50, after this hook) keeps a stanza_id it finds there, archives the message under
%% it and puts it on the broadcast and the room's history.
muc_filter_message(#message{} = Pkt, #state{server_host = SH} = State, _FromNick) ->
    %% A proposal is for the master, whoever sent it: no occupant sees it.
    Clean = strip_proposal(Pkt),
    case get(?MASTER_KEY) of
        undefined -> Clean;
        M ->
            case dmuc_nif:master_routes(M, jid:encode(xmpp:get_from(Pkt))) of
                false ->
                    %% A room with mirrors sends every message through them: one past the limits
                    %% is refused, whoever sent it, rather than shown to some occupants only.
                    case call(fun() -> {ok, enc(limits(SH), Pkt)} end) of
                        {error, {limit, _} = Why} -> refuse(Pkt, Why), drop;
                        _ -> Clean
                    end;
                true ->
                    watch_hear_from(State, xmpp:get_from(Pkt)),
                    case call(fun() -> dmuc_nif:master_groupchat(master(SH), now_ms(), enc(limits(SH), Pkt)) end) of
                        {error, {limit, _} = Why} -> refuse(Pkt, Why), drop;
                        {duplicate, Out} -> route_out(Out), drop;
                        {{broadcast, undefined}, Out} -> route_out(Out), Clean;
                        {{broadcast, Id}, Out} when is_integer(Id) ->
                            route_out(Out),
                            xmpp:put_meta(Clean, stanza_id, Id);
                        _ -> Clean
                    end
            end
    end;
muc_filter_message(Acc, _State, _FromNick) -> Acc.

strip_proposal(Pkt) ->
    %% Every element of dmuc's own namespace (the stanza-id proposal, the de-duplication key).
    xmpp:set_els(Pkt, [El || El <- xmpp:get_els(Pkt),
                            not (is_record(El, xmlel)
                                 andalso fxml:get_tag_attr_s(<<"xmlns">>, El) == <<"urn:xmpp:dmuc:0">>)]).

history(M, Req, RoomJID, #state{history = #lqueue{queue = Q}, subject = Subject,
                                subject_author = Author}) ->
    Messages = [enc(xmpp:set_from_to(P, jid:replace_resource(RoomJID, Nick), undefined))
                || {Nick, P, _HaveSubject, _TS, _Size} <- p1_queue:to_list(Q)],
    SubjectMsg = #message{from = jid:replace_resource(RoomJID, Author), type = groupchat,
                          subject = case Subject of [] -> [#text{}]; S -> S end},
    case call(fun() -> dmuc_nif:master_history(M, now_ms(), Req, Messages, enc(SubjectMsg)) end) of
        {error, _} -> ok;
        Out -> route_out(Out)
    end.

%% Groupchat fan-out: occupants behind a mirror become one copy per mirror.
multicast_route({From, Domain, Dests, Packet, Wrapped} = Acc) ->
    case get(?MASTER_KEY) of
        undefined -> Acc;
        M ->
            Room = jid:encode(jid:remove_resource(From)),
            Begin = call(fun() -> dmuc_nif:master_begin(M, Room) end),
            Direct = lists:filter(
                       fun(To) ->
                               ToBin = jid:encode(To),
                               case dmuc_nif:master_routes(M, ToBin) of
                                   false -> true;
                                   true ->
                                       Copy = xmpp:set_from_to(Packet, From, To),
                                       case call(fun() -> dmuc_nif:master_outbound(M, now_ms(), enc(room_limits(), Copy)) end) of
                                           {error, _} -> true;
                                           {drop, Out} -> route_out(Out), false;
                                           {{replace, Xml}, Out} -> route_out(Out ++ [Xml]), false;
                                           {_, Out} -> route_out(Out), true
                                       end
                               end
                       end, Dests),
            End = call(fun() -> dmuc_nif:master_end(M, Room) end),
            [route_out(Out) || Out <- [Begin, End], is_list(Out)],
            master_actions(M),
            {From, Domain, Direct, Packet, Wrapped}
    end.

%% What the engine asks of the room after a broadcast. A config announcement (status 104,
%% 170-174) waits in the engine for the room's config form, but ejabberd's room sends it before
%% it applies the new config (change_config), and this hook cannot see the room's state: the
%% engine is told there is no form and reads the change from the announcement itself.
master_actions(M) ->
    case call(fun() -> dmuc_nif:master_actions(M) end) of
        Actions when is_list(Actions) ->
            lists:foreach(
              fun({config, Room}) ->
                      case call(fun() -> dmuc_nif:master_config(M, now_ms(), Room, <<>>) end) of
                          Out when is_list(Out) -> route_out(Out);
                          _ -> ok
                      end;
                 (Evict) -> evict(Evict)
              end, Actions);
        _ -> ok
    end.

%% Everything a room routes one stanza at a time: presences, history, subject, errors. Runs in
%% the room's process (where its engine lives) for the room's own stanzas. Also adds the DMUC
%% feature to the MUC service's disco#info answers.
filter_packet(drop) -> drop;
filter_packet(#iq{type = get, to = #jid{luser = <<>>, lresource = <<>>, lserver = Service}} = IQ) ->
    %% A ping to a MUC service with a link watch: a mirror proves its link alive.
    case persistent_term:get({?MODULE, watch, Service}, undefined) of
        undefined -> IQ;
        {W, Proc} ->
            case xmpp:get_subtag(IQ, #ping{}) of
                false -> IQ;
                _ ->
                    case call_for(ejabberd_router:host_of_route(Service),
                                  fun() -> dmuc_nif:watch_ping(W, now_ms(), enc(limits(ejabberd_router:host_of_route(Service)), IQ)) end) of
                        {error, {limit, _} = Why} -> refuse(IQ, Why), drop;
                        {<<>>, _, _} -> IQ;
                        {Reply, Events, At} ->
                            route_out([Reply]),
                            gen_server:cast(Proc, {link_events, Service, Events, At}),
                            drop;
                        _ -> IQ
                    end
            end
    end;
filter_packet(#iq{type = T, id = <<"dmuc-probe-", _/binary>>,
                  to = #jid{luser = <<>>, lresource = <<>>, lserver = Service}} = IQ)
  when T == result; T == error ->
    %% The answer (or bounce) to the link watch's probe of a mirror after an s2s session closed.
    case persistent_term:get({?MODULE, watch, Service}, undefined) of
        undefined -> IQ;
        {W, Proc} ->
            case call_for(ejabberd_router:host_of_route(Service),
                          fun() -> dmuc_nif:watch_answer(W, now_ms(), enc(limits(ejabberd_router:host_of_route(Service)), IQ)) end) of
                {true, Events, At} ->
                    gen_server:cast(Proc, {link_events, Service, Events, At}),
                    drop;
                _ -> IQ
            end
    end;
filter_packet(#iq{type = result, from = #jid{luser = <<>>, lresource = <<>>} = From} = IQ) ->
    case xmpp:get_subtag(IQ, #disco_info{}) of
        #disco_info{node = <<>>, features = F} = Info ->
            case persistent_term:get({?MODULE, master_config, ejabberd_router:host_of_route(From#jid.lserver)}, undefined) of
                undefined -> IQ;
                _ ->
                    case gen_mod:is_loaded(ejabberd_router:host_of_route(From#jid.lserver), mod_muc)
                        andalso lists:member(?NS_MUC, F) of
                        true -> xmpp:set_els(IQ, [Info#disco_info{features = F ++ [?NS_DMUC]}]);
                        false -> IQ
                    end
            end;
        _ -> IQ
    end;
filter_packet(Pkt) ->
    case get(?MASTER_KEY) of
        undefined -> Pkt;
        M ->
            case xmpp:get_to(Pkt) of
                undefined -> Pkt;
                To ->
                    case dmuc_nif:master_routes(M, jid:encode(To)) of
                        false -> Pkt;
                        true ->
                            case call(fun() -> dmuc_nif:master_outbound(M, now_ms(), enc(room_limits(), Pkt)) end) of
                                %% The mirror could not take it either (logged by call/1).
                                {error, {limit, _}} -> drop;
                                {error, _} -> Pkt;
                                {drop, Out} -> route_out(Out), drop;
                                {{replace, Xml}, Out} -> route_out(Out ++ [Xml]), drop;
                                {_, Out} -> route_out(Out), Pkt
                            end
                    end
            end
    end.

leave_room(_ServerHost, Room, Host, JID) ->
    case get(?MASTER_KEY) of
        undefined -> ok;
        M ->
            _ = call(fun() -> dmuc_nif:master_left(M, <<Room/binary, "@", Host/binary>>, jid:encode(JID)) end),
            ok
    end.

%%%===================================================================
%%% Mirror
%%%===================================================================
start_link(Host, Opts) ->
    gen_server:start_link({local, gen_mod:get_module_proc(Host, ?MODULE)}, ?MODULE, [Host, Opts], []).

init([Host, Opts]) ->
    process_flag(trap_exit, true),
    put(?LOG_HOST_KEY, Host),
    Proc = gen_mod:get_module_proc(Host, ?MODULE),
    case init_watch(Host, Opts, Proc) of
        {error, Reason} -> {stop, {bad_option, Reason}};
        Watched ->
            case init_mirror(Host, Opts, Proc) of
                {error, Reason} -> {stop, {bad_option, Reason}};
                Service ->
                    {ok, #{host => Host, service => Service, watched => Watched,
                           timer => undefined, watch_timers => #{}}}
            end
    end.

%% Master role: one link watch per MUC service of this host.
init_watch(Host, Opts, Proc) ->
    case gen_mod:get_opt(trusted_mirrors, Opts) of
        [] -> [];
        Trusted ->
            Services = gen_mod:get_module_opt_hosts(Host, mod_muc),
            case lists:foldl(
                   fun(_, {error, _} = E) -> E;
                      (Service, Acc) ->
                           case dmuc_nif:watch_new(Trusted, gen_mod:get_opt(link_timeout, Opts)) of
                               {ok, W} ->
                                   persistent_term:put({?MODULE, watch, Service}, {W, Proc}),
                                   [Service | Acc];
                               {error, _} = E -> E
                           end
                   end, [], Services) of
                {error, _} = E -> E;
                Watched ->
                    %% An s2s session closing makes the watches probe the mirror.
                    ejabberd_hooks:add(s2s_out_closed, Host, ?MODULE, watch_s2s_out_closed, 60),
                    ejabberd_hooks:add(s2s_in_closed, Host, ?MODULE, watch_s2s_in_closed, 60),
                    Watched
            end
    end.

%% Mirror role: the engine, its stored queue, its hooks and route.
init_mirror(Host, Opts, Proc) ->
    case gen_mod:get_opt(masters, Opts) of
        [] -> undefined;
        Masters ->
            Service = gen_mod:get_opt(mirror_host, Opts),
            case dmuc_nif:mirror_new(Service, Masters, gen_mod:get_opt(queue_limit, Opts),
                                     gen_mod:get_opt(join_timeout, Opts), gen_mod:get_opt(history_size, Opts),
                                     gen_mod:get_opt(ping_interval, Opts), gen_mod:get_opt(ping_timeout, Opts),
                                     gen_mod:get_opt(catch_up_margin, Opts),
                                     gen_mod:get_opt(max_stanza_depth, Opts), gen_mod:get_opt(max_stanza_size, Opts),
                                     gen_mod:get_opt(max_local_occupants, Opts), gen_mod:get_opt(max_rooms, Opts),
                                     gen_mod:get_opt(store_after, Opts)) of
                {error, Reason} ->
                    {error, Reason};
                {ok, M} ->
                    persistent_term:put({?MODULE, mirror, Host}, {M, Proc}),
                    persistent_term:put({?MODULE, proc_host, Proc}, Host),
                    persistent_term:put({?MODULE, mirror_service, Service}, {M, Proc}),
                    persistent_term:put({?MODULE, limits, Service}, limits(Host)),
                    %% On disc like the old whole-queue table (each write reaches the file), but a
                    %% message now costs one small row written and one deleted.
                    ejabberd_mnesia:create(?MODULE, dmuc_queue_item,
                                           [{disc_only_copies, [node()]}, {type, set},
                                            {attributes, record_info(fields, dmuc_queue_item)}]),
                    Stored = [I || #dmuc_queue_item{item = I}
                                       <- mnesia:dirty_match_object(#dmuc_queue_item{key = {Service, '_'}, item = '_'})],
                    %% A table of an older version (one row of the whole queue): taken over.
                    Legacy = case catch mnesia:dirty_read(dmuc_queue, Service) of
                                 [#dmuc_queue{items = I}] -> I;
                                 _ -> []
                             end,
                    Items = Legacy ++ Stored,
                    ?INFO_MSG("dmuc mirror ~ts for ~p (~b stored queue item(s))", [Service, Masters, length(Items)]),
                    counters:add(store_counters(Service), 3, length(Stored)),
                    _ = mirror_run(M, Proc, fun() -> dmuc_nif:mirror_import(M, now_ms(), Items) end),
                    case Legacy of
                        [] -> ok;
                        _ ->
                            %% Stored per item first, then the old row goes.
                            persist(#{host => Host, service => Service}),
                            catch mnesia:dirty_delete(dmuc_queue, Service)
                    end,
                    ejabberd_router:register_route(Service, Host, {apply, ?MODULE, route}),
                    ejabberd_hooks:add(user_send_packet, Host, ?MODULE, user_send_packet, ?SEND_PRIO),
                    ejabberd_hooks:add(user_receive_packet, Host, ?MODULE, user_receive_packet, 50),
                    ejabberd_hooks:add(c2s_self_presence, Host, ?MODULE, c2s_self_presence, 50),
                    ejabberd_hooks:add(c2s_terminated, Host, ?MODULE, c2s_terminated, 50),
                    ejabberd_hooks:add(filter_packet, ?MODULE, filter_pong, 40),
                    ejabberd_hooks:add(s2s_out_closed, Host, ?MODULE, s2s_out_closed, 50),
                    ejabberd_hooks:add(s2s_in_closed, Host, ?MODULE, s2s_in_closed, 50),
                    Service
            end
    end.

handle_call(_Request, _From, State) -> {reply, ok, State}.

handle_cast(drain, State) ->
    {noreply, persist(drain(State))};
handle_cast({s2s_out_closed, Pid, FromTo}, State) ->
    _ = erlang:monitor(process, Pid, [{tag, {s2s_out_gone, mirror, FromTo}}]),
    {noreply, State};
handle_cast({watch_s2s_out_closed, Pid, FromTo}, State) ->
    _ = erlang:monitor(process, Pid, [{tag, {s2s_out_gone, watch, FromTo}}]),
    {noreply, State};
handle_cast({link_events, Service, Events, At}, State) ->
    tell_rooms(Service, Events),
    {noreply, arm_watch(Service, At, State)};
handle_cast({watch_s2s_closed, Remote}, State) ->
    {noreply, watch_s2s_closed(Remote, State)};
handle_cast(_Msg, State) -> {noreply, State}.

%% The link watches probe the mirror that is, or speaks for, `Remote`.
watch_s2s_closed(Remote, #{watched := Watched} = State) ->
    lists:foldl(
      fun(Service, St) ->
              case persistent_term:get({?MODULE, watch, Service}, undefined) of
                  undefined -> St;
                  {W, _} ->
                      case call(fun() -> dmuc_nif:watch_s2s_closed(W, now_ms(), Service, Remote) end) of
                          {Probes, Events, At} when is_list(Probes) ->
                              route_out(Probes),
                              tell_rooms(Service, Events),
                              arm_watch(Service, At, St);
                          _ -> St
                      end
              end
      end, State, Watched).

%% Route what the mirror engine made, in order (only this process does), and re-arm its timer.
drain(#{host := Host} = State) ->
    case persistent_term:get({?MODULE, mirror, Host}, undefined) of
        undefined -> State;
        {M, _} ->
            case call(fun() -> dmuc_nif:mirror_drain(M) end) of
                {Out, At} when is_list(Out) -> route_out(Out), schedule(At, State);
                _ -> State
            end
    end.

schedule(0, State) -> State;
schedule(At, #{timer := T} = State) ->
    case T of
        {_Ref, Old} when Old =< At -> State;
        {Ref, _} -> erlang:cancel_timer(Ref), arm(At, now_ms(), State);
        undefined -> arm(At, now_ms(), State)
    end.

arm(At, Now, State) ->
    Ref = erlang:send_after(max(0, At - Now), self(), timeout),
    State#{timer => {Ref, At}}.

%% One timer per link watch, at its earliest deadline.
arm_watch(_Service, 0, State) -> State;
arm_watch(Service, At, #{watch_timers := Timers} = State) ->
    case maps:get(Service, Timers, undefined) of
        {_Ref, Old} when Old =< At -> State;
        Prev ->
            case Prev of {R, _} -> erlang:cancel_timer(R); undefined -> ok end,
            Ref = erlang:send_after(max(0, At - now_ms()), self(), {watch_timeout, Service}),
            State#{watch_timers => Timers#{Service => {Ref, At}}}
    end.

%% Each online room of the service hears of each link change (its engine evicts, or resumes).
tell_rooms(_Service, []) -> ok;
tell_rooms(Service, Events) ->
    Rooms = mod_muc:get_online_rooms(Service),
    lists:foreach(
      fun({Mirror, Up}) ->
              ?INFO_MSG("dmuc: mirror ~ts ~ts", [Mirror, case Up of true -> "back"; false -> "lost" end]),
              Link = #xmlel{name = <<"link">>,
                            attrs = [{<<"xmlns">>, ?NS_LINK}, {<<"mirror">>, Mirror},
                                     {<<"up">>, atom_to_binary(Up, utf8)}]},
              lists:foreach(
                fun(Room) ->
                        {Name, RoomHost} = case Room of
                                               {N, H, _Pid} -> {N, H};
                                               {N, H} -> {N, H}
                                           end,
                        ejabberd_router:route(
                          #iq{type = set, id = p1_rand:get_string(),
                              from = jid:make(Service), to = jid:make(Name, RoomHost),
                              sub_els = [Link]})
                end, Rooms)
      end, Events).

handle_info(timeout, #{host := Host} = State) ->
    {M, _} = persistent_term:get({?MODULE, mirror, Host}),
    _ = call(fun() -> dmuc_nif:mirror_timeout(M, now_ms()) end),
    {noreply, persist(drain(State#{timer => undefined}))};
handle_info({watch_timeout, Service}, #{watch_timers := Timers} = State) ->
    State1 = State#{watch_timers => maps:remove(Service, Timers)},
    case persistent_term:get({?MODULE, watch, Service}, undefined) of
        undefined -> {noreply, State1};
        {W, _} ->
            case call(fun() -> dmuc_nif:watch_timeout(W, now_ms()) end) of
                {_, Events, At} ->
                    tell_rooms(Service, Events),
                    {noreply, arm_watch(Service, At, State1)};
                _ -> {noreply, State1}
            end
    end;
handle_info({{s2s_out_gone, Role, FromTo}, _Ref, process, Pid, _Why}, State) ->
    s2s_out_gone(Role, FromTo, Pid, State);
handle_info({s2s_out_gone, Role, FromTo, Pid}, State) ->
    s2s_out_gone(Role, FromTo, Pid, State);
handle_info(_Info, State) -> {noreply, State}.

%% The closed connection's process is gone; once ejabberd_s2s has forgotten it too (it does so
%% on its own monitor, a moment later), the mirror sends again what was in flight, or the master's
%% link watches probe.
s2s_out_gone(Role, {_, RServer} = FromTo, Pid, #{host := Host} = State) ->
    case lists:member(Pid, ejabberd_s2s:get_connections_pids(FromTo)) of
        true ->
            erlang:send_after(20, self(), {s2s_out_gone, Role, FromTo, Pid}),
            {noreply, State};
        false when Role == watch ->
            {noreply, watch_s2s_closed(RServer, State)};
        false ->
            case persistent_term:get({?MODULE, mirror, Host}, undefined) of
                undefined -> {noreply, State};
                {M, _} ->
                    _ = call(fun() -> dmuc_nif:mirror_s2s_closed(M, now_ms(), RServer) end),
                    {noreply, persist(drain(State))}
            end
    end.

%% Apply the engine's changes to the stored queue, one row each (in this process, so that
%% writes keep their order).
persist(#{service := undefined} = State) -> State;
persist(#{host := Host, service := Service} = State) ->
    case persistent_term:get({?MODULE, mirror, Host}, undefined) of
        undefined -> State;
        {M, _} ->
            case call(fun() -> dmuc_nif:mirror_persist(M) end) of
                Ops when is_list(Ops) ->
                    C = store_counters(Service),
                    lists:foreach(
                      fun({put, Key, Item}) ->
                              mnesia:dirty_write(#dmuc_queue_item{key = {Service, Key}, item = Item}),
                              counters:add(C, 1, 1), counters:add(C, 3, 1);
                         ({delete, Key, _}) ->
                              mnesia:dirty_delete(dmuc_queue_item, {Service, Key}),
                              counters:add(C, 2, 1), counters:sub(C, 3, 1)
                      end, Ops);
                _ -> ok
            end,
            State
    end.

%% Puts, deletes and stored items of a mirror service's queue, for `ejabberdctl dmuc_status`.
store_counters(Service) ->
    case persistent_term:get({?MODULE, store_counters, Service}, undefined) of
        undefined ->
            C = counters:new(3, [write_concurrency]),
            persistent_term:put({?MODULE, store_counters, Service}, C),
            C;
        C -> C
    end.

terminate(_Reason, #{host := Host, service := Service, watched := Watched} = State) ->
    [persistent_term:erase({?MODULE, watch, S}) || S <- Watched],
    case Watched of
        [] -> ok;
        _ ->
            ejabberd_hooks:delete(s2s_out_closed, Host, ?MODULE, watch_s2s_out_closed, 60),
            ejabberd_hooks:delete(s2s_in_closed, Host, ?MODULE, watch_s2s_in_closed, 60)
    end,
    case Service of
        undefined -> ok;
        _ ->
            %% What the engine holds back from the store (write-behind) is stored now.
            case persistent_term:get({?MODULE, mirror, Host}, undefined) of
                {M, _} -> _ = call(fun() -> dmuc_nif:mirror_flush_store(M) end);
                undefined -> ok
            end,
            persist(State),
            ejabberd_hooks:delete(user_send_packet, Host, ?MODULE, user_send_packet, ?SEND_PRIO),
            ejabberd_hooks:delete(user_receive_packet, Host, ?MODULE, user_receive_packet, 50),
            ejabberd_hooks:delete(c2s_self_presence, Host, ?MODULE, c2s_self_presence, 50),
            ejabberd_hooks:delete(c2s_terminated, Host, ?MODULE, c2s_terminated, 50),
            ejabberd_hooks:delete(filter_packet, ?MODULE, filter_pong, 40),
            ejabberd_hooks:delete(s2s_out_closed, Host, ?MODULE, s2s_out_closed, 50),
            ejabberd_hooks:delete(s2s_in_closed, Host, ?MODULE, s2s_in_closed, 50),
            ejabberd_router:unregister_route(Service),
            persistent_term:erase({?MODULE, mirror, Host}),
            persistent_term:erase({?MODULE, proc_host, gen_mod:get_module_proc(Host, ?MODULE)}),
            persistent_term:erase({?MODULE, mirror_service, Service})
    end,
    ok.

code_change(_OldVsn, State, _Extra) -> {ok, State}.

%% Run a mirror call; this module's process routes what it produced. Returns consumed | pass.
mirror_run(_M, Proc, F) ->
    case call_for(persistent_term:get({?MODULE, proc_host, Proc}, undefined), F) of
        {Verdict, _, _} ->
            gen_server:cast(Proc, drain),
            Verdict;
        {error, Why} ->
            {error, Why}
    end.

%% Local users' presences to occupant JIDs and groupchat messages go through the mirror.
user_send_packet({Pkt, #{lserver := LServer} = C2S} = Acc) ->
    case persistent_term:get({?MODULE, mirror, LServer}, undefined) of
        undefined -> Acc;
        {M, Proc} ->
            case is_mirror_stanza(Pkt) andalso dmuc_nif:mirror_handles(M, jid:encode(xmpp:get_to(Pkt))) of
                true ->
                    case mirror_run(M, Proc, fun() -> dmuc_nif:mirror_local(M, now_ms(), enc(limits(LServer), Pkt)) end) of
                        consumed -> {drop, C2S};
                        {error, Why} ->
                            refuse(Pkt, Why),
                            {drop, C2S};
                        _ -> Acc
                    end;
                false -> Acc
            end
    end;
user_send_packet(Acc) -> Acc.

%% A local user who goes unavailable (their presence broadcast, or their stream closing) leaves
%% the mirrored rooms they are in. ejabberd sends the broadcast to the session's directed
%% presences (pres_a), but a join the mirror took never got there, so without this the user
%% stays in the room at the master and at the mirror. A user already gone has nothing to leave.
c2s_self_presence({#presence{type = unavailable} = Pres, #{lserver := LServer}} = Acc) ->
    mirror_gone(LServer, Pres),
    Acc;
c2s_self_presence(Acc) -> Acc.

c2s_terminated(#{lserver := LServer, jid := #jid{luser = U} = JID} = State, _Reason) when U /= <<>> ->
    mirror_gone(LServer, #presence{type = unavailable, from = JID, to = jid:remove_resource(JID)}),
    State;
c2s_terminated(State, _Reason) -> State.

mirror_gone(LServer, Pres) ->
    case persistent_term:get({?MODULE, mirror, LServer}, undefined) of
        undefined -> ok;
        {M, Proc} ->
            _ = mirror_run(M, Proc, fun() -> dmuc_nif:mirror_unavailable(M, now_ms(), enc(limits(LServer), Pres)) end),
            ok
    end.

%% A cheap filter only: the engine decides (presences to occupants, leaves to the bare room,
%% groupchat messages, self-pings).
is_mirror_stanza(#presence{}) -> true;
is_mirror_stanza(#message{type = groupchat}) -> true;
is_mirror_stanza(#iq{type = get, to = #jid{lresource = R}}) when R /= <<>> -> true;
is_mirror_stanza(_) -> false.

%% A join error the master sent straight to the user ends the mirror's pending join. A message
%% error is the s2s bounce of a message in flight (sent again later: the user must not see it),
%% or the master saying the user is not in the room (the mirror rejoins them).
user_receive_packet({Pkt, #{lserver := LServer} = C2S} = Acc)
  when is_record(Pkt, presence), Pkt#presence.type == error;
       is_record(Pkt, message), Pkt#message.type == error ->
    case persistent_term:get({?MODULE, mirror, LServer}, undefined) of
        undefined -> Acc;
        {M, Proc} ->
            case dmuc_nif:mirror_handles(M, jid:encode(xmpp:get_from(Pkt))) of
                true ->
                    case mirror_run(M, Proc, fun() -> dmuc_nif:mirror_remote(M, now_ms(), enc(limits(LServer), Pkt)) end) of
                        consumed when is_record(Pkt, message) -> {drop, C2S};
                        _ -> Acc
                    end;
                false -> Acc
            end
    end;
user_receive_packet(Acc) -> Acc.

%% Answers to the mirror's pings, sent from this host's domain so that they share its users'
%% s2s stream.
filter_pong(#iq{type = T, to = #jid{luser = <<>>, lresource = <<>>, lserver = LServer}, from = From} = IQ)
  when T == result; T == error ->
    case persistent_term:get({?MODULE, mirror, LServer}, undefined) of
        undefined -> IQ;
        {M, Proc} ->
            case dmuc_nif:mirror_handles(M, jid:encode(From)) of
                true ->
                    case mirror_run(M, Proc, fun() -> dmuc_nif:mirror_remote(M, now_ms(), enc(limits(LServer), IQ)) end) of
                        consumed -> drop;
                        _ -> IQ
                    end;
                false -> IQ
            end
    end;
filter_pong(Pkt) -> Pkt.

%% An s2s connection to a master closed: what was written into it may be lost unbounced. This
%% runs in the closing connection's process, which is still the registered route: what the
%% mirror sends again must wait until it is gone, or it would die with it.
s2s_out_closed(#{server := LServer, remote_server := RServer} = State, _Reason) ->
    case persistent_term:get({?MODULE, mirror, LServer}, undefined) of
        undefined -> ok;
        {M, Proc} ->
            case dmuc_nif:mirror_handles(M, RServer) of
                true ->
                    %% Now: newer messages wait behind what was in flight.
                    _ = mirror_run(M, Proc, fun() -> dmuc_nif:mirror_s2s_closing(M, now_ms(), RServer) end),
                    gen_server:cast(Proc, {s2s_out_closed, self(), {LServer, RServer}});
                false -> ok
            end
    end,
    State;
s2s_out_closed(State, _Reason) -> State.

%% Master role: an s2s session of this host with a remote domain closed, in either direction,
%% for any reason. The link watches probe the mirror that is, or speaks for, that domain; this
%% module's process does it (the hook runs in the connection's process).
watch_s2s_out_closed(#{server_host := ServerHost, server := LServer, remote_server := RServer} = State,
                     _Reason) ->
    watch_out_closed(ServerHost, LServer, RServer),
    State;
watch_s2s_out_closed(#{server := LServer, remote_server := RServer} = State, _Reason) ->
    watch_out_closed(ejabberd_router:host_of_route(LServer), LServer, RServer),
    State;
watch_s2s_out_closed(State, _Reason) -> State.

%% ejabberd routes to a closing outgoing connection for a moment: a probe sent now would go into
%% it and be lost. The probe goes once the connection's process is gone (see s2s_out_gone/4).
watch_out_closed(ServerHost, LServer, RServer) ->
    gen_server:cast(gen_mod:get_module_proc(ServerHost, ?MODULE),
                    {watch_s2s_out_closed, self(), {LServer, RServer}}).

watch_s2s_in_closed(#{server_host := ServerHost} = State, _Reason) ->
    Domains = case maps:get(auth_domains, State, undefined) of
                  undefined -> [];
                  Set -> sets:to_list(Set)
              end,
    Proc = gen_mod:get_module_proc(ServerHost, ?MODULE),
    [gen_server:cast(Proc, {watch_s2s_closed, D}) || D <- Domains],
    State;
watch_s2s_in_closed(State, _Reason) -> State.

%% An s2s connection from a master closed: what it was sending may be lost; the rooms catch up.
s2s_in_closed(#{server_host := ServerHost} = State, _Reason) ->
    Domains = case maps:get(auth_domains, State, undefined) of
                  undefined -> [];
                  Set -> sets:to_list(Set)
              end,
    case persistent_term:get({?MODULE, mirror, ServerHost}, undefined) of
        undefined -> ok;
        {M, Proc} ->
            [mirror_run(M, Proc, fun() -> dmuc_nif:mirror_s2s_in_closed(M, now_ms(), D) end)
             || D <- Domains, dmuc_nif:mirror_handles(M, D)]
    end,
    State;
s2s_in_closed(State, _Reason) -> State.

%%%===================================================================
%%% Status: ejabberdctl dmuc_status
%%%===================================================================
get_commands_spec() ->
    [#ejabberd_commands{name = dmuc_status, tags = [muc],
                        desc = "Show the dmuc links: state per mirror and per master, queue depth, "
                               "last resync",
                        module = ?MODULE, function = dmuc_status,
                        args = [], result = {status, string}}].

dmuc_status() ->
    Now = now_ms(),
    Ago = fun(0) -> "never"; (T) -> io_lib:format("~bs ago", [(Now - T) div 1000]) end,
    Watches = [{S, W} || {{?MODULE, watch, S}, {W, _}} <- persistent_term:get()],
    Mirrors = [M || {{?MODULE, mirror, _}, {M, _}} <- persistent_term:get()],
    Lines =
        [io_lib:format("~ts: mirror ~ts ~ts, last ping ~ts, ~b outage(s)",
                       [S, Mirror, case Up of true -> "up"; false -> "DOWN" end, Ago(Seen), Outages])
         || {S, W} <- Watches, {Mirror, Up, Seen, Outages} <- ok_list(dmuc_nif:watch_status(W))] ++
        [io_lib:format("master ~ts ~ts, ~b room(s), ~b queued, ~b in flight, last pong ~ts, "
                       "last resync ~ts, ~b outage(s)",
                       [Master, case Up of true -> "up"; false -> "DOWN" end, Rooms, Queued, InFlight,
                        Ago(Pong), Ago(Resync), Outages])
         || M <- Mirrors,
            {{Master, Up}, {Rooms, Queued, InFlight, Outages}, {Pong, Resync, _Down}}
                <- ok_list(dmuc_nif:mirror_status(M))] ++
        [io_lib:format("~ts: stored queue ~b item(s), ~b put(s), ~b delete(s) since start",
                       [S, counters:get(C, 3), counters:get(C, 1), counters:get(C, 2)])
         || {{?MODULE, store_counters, S}, C} <- persistent_term:get()],
    lists:flatten(lists:join("\n", Lines)).

ok_list({ok, L}) -> L;
ok_list(_) -> [].

%% Stanzas to the mirror service and to users' escaped JIDs at it.
route(Pkt) ->
    To = xmpp:get_to(Pkt),
    case persistent_term:get({?MODULE, mirror_service, To#jid.lserver}, undefined) of
        undefined -> ok;
        {M, Proc} ->
            case mirror_run(M, Proc, fun() -> dmuc_nif:mirror_remote(M, now_ms(), enc(limits(To#jid.lserver), Pkt)) end) of
                consumed -> ok;
                {error, Why} -> refuse(Pkt, Why);
                pass ->
                    ejabberd_router:route_error(Pkt, xmpp:err_service_unavailable())
            end
    end.
